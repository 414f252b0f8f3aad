//! `licensor crd`: print a CRD generated from its Rust type.

use clap::{Args, ValueEnum};

use super::{FAILED, OK};

#[derive(Args, Debug)]
pub struct CrdArgs {
    /// Which resource's CRD.
    #[arg(value_enum, default_value = "dedicated-license")]
    pub kind: Kind,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// DedicatedLicense (namespaced): the licenses one organization holds.
    DedicatedLicense,
    /// LicensePool (cluster-scoped, status only): one product's pool.
    LicensePool,
}

pub fn run(args: &CrdArgs) -> u8 {
    let yaml = match args.kind {
        Kind::DedicatedLicense => crate::resource::crd_yaml(),
        Kind::LicensePool => crate::licensepool::crd_yaml(),
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
