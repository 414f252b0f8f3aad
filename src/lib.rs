//! licensor: dedicated licenses, declared in Git and reconciled.
//!
//! ```text
//!     manifests (YAML, Git)        DedicatedLicense objects (Kubernetes)
//!              \                          /
//!               v                        v
//!         desired state  +  observed backend snapshot
//!                        |
//!                  plan (pure: no I/O)   -> changes, refusals, unified diff, pool impact
//!                        |
//!                  apply (backend write, ordered: frees before claims)
//!                        |
//!                  report (CLI output)  /  status + events (operator)
//! ```
//!
//! Read top to bottom: [`manifest`] loads YAML, [`plan`] decides with the
//! rules of [`domain`], [`apply`] writes through a [`backend::Backend`],
//! [`cli`] reports. [`resource`] is the Kubernetes custom resource and
//! [`operator`] the controller that reconciles it with the same planner.
#![forbid(unsafe_code)]

pub mod api;
pub mod apply;
pub mod backend;
pub mod cli;
pub mod domain;
pub mod endpoints;
pub mod history;
pub mod licenseaccount;
pub mod licensepool;
pub mod manifest;
pub mod operator;
pub mod plan;
pub mod resource;
pub mod server;
pub mod shutdown;
pub mod tls;
