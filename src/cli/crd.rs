//! `licensor crd`: print the CRDs generated from their Rust types.

use clap::{Args, ValueEnum};

use super::{FAILED, OK};

#[derive(Args, Debug)]
pub struct CrdArgs {
    /// Which resource's CRD; all of them (what `crds/` holds) by default.
    #[arg(value_enum, default_value = "all")]
    pub kind: Kind,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Every CRD, as one YAML stream (the file in `crds/`).
    All,
    /// DedicatedLicense (namespaced): the licenses one organization holds.
    DedicatedLicense,
    /// LicensePool (cluster-scoped, status only): one product's pool.
    LicensePool,
    /// LicenseAccount (cluster-scoped): an account's backend, credentials
    /// and tenants.
    LicenseAccount,
}

pub fn run(args: &CrdArgs) -> u8 {
    let yaml = match args.kind {
        Kind::All => [
            crate::resource::crd_yaml,
            crate::licensepool::crd_yaml,
            crate::licenseaccount::crd_yaml,
        ]
        .iter()
        .map(|crd| crd())
        .collect::<Result<Vec<_>, _>>()
        .map(|docs| docs.join("---\n")),
        Kind::DedicatedLicense => crate::resource::crd_yaml(),
        Kind::LicensePool => crate::licensepool::crd_yaml(),
        Kind::LicenseAccount => crate::licenseaccount::crd_yaml(),
    };
    match yaml {
        Ok(yaml) => {
            print!("{yaml}");
            OK
        }
        Err(e) => {
            eprintln!("error: cannot render the CRD: {e}");
            FAILED
        }
    }
}
