//! `licensor validate`: offline checks of manifests, no backend needed.

use clap::Args;

use super::{FAILED, Files, OK, load_manifests};

#[derive(Args, Debug)]
pub struct ValidateArgs {
    #[command(flatten)]
    pub files: Files,
}

pub fn run(args: &ValidateArgs) -> u8 {
    match load_manifests(&args.files) {
        Some((manifests, _)) => {
            println!(
                "{} DedicatedLicense manifest{} valid",
                manifests.len(),
                if manifests.len() == 1 { "" } else { "s" }
            );
            OK
        }
        None => FAILED,
    }
}
