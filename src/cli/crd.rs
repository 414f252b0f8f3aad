//! `licensor crd`: print the CRD generated from the Rust type.

use super::{FAILED, OK};
use crate::resource::crd_yaml;

pub fn run() -> u8 {
    match crd_yaml() {
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
