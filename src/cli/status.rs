//! `licensor status`: pools and allocations as the backend holds them.

use clap::Args;

use super::render::{status_markdown, status_text};
use super::{FAILED, Format, Global, OK, observe};
use crate::domain::PoolView;

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value = "text")]
    pub output: Format,
}

pub async fn run(g: &Global, args: &StatusArgs) -> u8 {
    let (backend, snapshot) = match observe(g).await {
        Ok(observed) => observed,
        Err(e) => {
            eprintln!("error: {e}");
            return FAILED;
        }
    };
    let now = chrono::Utc::now();
    match args.output {
        Format::Json => {
            let pools: Vec<PoolView> = snapshot.pools.iter().map(PoolView::from).collect();
            let allocations: Vec<_> = snapshot
                .allocations
                .iter()
                .map(|a| {
                    serde_json::json!({
                        "organization": a.organization,
                        "product": a.product,
                        "dedicated": a.dedicated,
                        "inUse": a.in_use,
                        "managedBy": a.managed_by,
                        // What deleting (or pruning) its manager does.
                        "deletionPolicy": a.managed_by.as_ref().map(|_| a.deletion_policy),
                        // When its manager lowers it to thenCount.
                        "expiry": a.expiry,
                    })
                })
                .collect();
            let doc = serde_json::json!({"pools": pools, "allocations": allocations});
            match serde_json::to_string_pretty(&doc) {
                Ok(s) => println!("{s}"),
                Err(e) => {
                    eprintln!("error: {e}");
                    return FAILED;
                }
            }
        }
        Format::Markdown => print!("{}", status_markdown(&snapshot, &backend.location(), now)),
        Format::Text => print!("{}", status_text(&snapshot, &backend.location(), now)),
    }
    OK
}
