//! `licensor backend ...`: seed an account, change seats in use or totals,
//! read the audit log. These stand in for the license platform's own UI.

use std::path::PathBuf;

use clap::Subcommand;

use super::{FAILED, Global, OK, Open, open_backend, open_store_at, render};
use crate::api::audit_csv;
use crate::backend::{BackendError, Fixture};
use crate::domain::SeatChange;

/// `backend audit -o`: the formats of every table, and CSV.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuditFormat {
    Text,
    Markdown,
    Json,
    Csv,
}

#[derive(Subcommand, Debug)]
pub enum BackendCommand {
    /// Load an account fixture (products, organizations, allocations, seats in use).
    Seed {
        /// The fixture (YAML); `-` reads it from standard input (for
        /// `kubectl exec -i ... -f - < account.yaml`).
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
    /// Claim seats in use (users signing in).
    Claim(Seats),
    /// Release seats in use (users signing out).
    Release(Seats),
    /// Set a product's total (a purchase or a contract shrink).
    Total {
        /// The product whose pool changes.
        #[arg(long)]
        product: String,
        /// Seats purchased; may be below what is handed out (the pool is
        /// then over-committed).
        #[arg(long, allow_hyphen_values = true)]
        total: i64,
    },
    /// Print the audit log, oldest first.
    Audit {
        /// Output format (csv: a header row, then one row per record, for
        /// a spreadsheet).
        #[arg(short = 'o', long = "output", value_enum, default_value = "text")]
        output: AuditFormat,
    },
    /// Copy accounts whole from one store to another (sqlite:PATH <->
    /// postgres://...): pools, organizations, allocations with their
    /// versions and owners, seats in use, tokens (hashed), the audit log and
    /// live idempotency keys; then check the copy reads back the same.
    Copy {
        /// The store to copy from.
        #[arg(long)]
        from: String,
        /// The store to copy to (created if it is new).
        #[arg(long)]
        to: String,
        /// Replace an account the target already holds (else refused).
        #[arg(long)]
        replace: bool,
    },
}

#[derive(clap::Args, Debug)]
pub struct Seats {
    /// The organization whose users sign in or out.
    #[arg(long)]
    org: String,
    /// The product.
    #[arg(long)]
    product: String,
    /// How many seats (a positive number).
    #[arg(long, allow_hyphen_values = true)]
    count: i64,
}

pub async fn run(g: &Global, command: BackendCommand) -> u8 {
    match execute(g, command).await {
        Ok(()) => OK,
        Err(e) => {
            eprintln!("error: {e}");
            FAILED
        }
    }
}

async fn execute(g: &Global, command: BackendCommand) -> Result<(), String> {
    let backend = match &command {
        BackendCommand::Copy { from, to, replace } => return copy(g, from, to, *replace),
        BackendCommand::Seed { file } => return seed(g, file).await,
        _ => open_backend(g, Open::Existing)?,
    };
    let err = |e: BackendError| e.to_string();
    match command {
        // Handled above: they open their stores themselves.
        BackendCommand::Seed { .. } | BackendCommand::Copy { .. } => {}
        BackendCommand::Claim(s) | BackendCommand::Release(s) if s.count <= 0 => {
            return Err(format!("--count must be positive, not {}", s.count));
        }
        BackendCommand::Claim(s) => {
            backend
                .seats(&s.org, &s.product, SeatChange::Claim(s.count))
                .await
                .map_err(err)?;
            println!("{} claimed {} {} seats", s.org, s.count, s.product);
        }
        BackendCommand::Release(s) => {
            backend
                .seats(&s.org, &s.product, SeatChange::Release(s.count))
                .await
                .map_err(err)?;
            println!("{} released {} {} seats", s.org, s.count, s.product);
        }
        BackendCommand::Total { product, total } => {
            let pool = backend.set_total(&product, total).await.map_err(err)?;
            println!(
                "{product}: total {}, dedicated {}, shared in use {}, free {}{}",
                pool.total,
                pool.dedicated,
                pool.shared_in_use,
                pool.free,
                if pool.is_over_committed() {
                    " (OverCommitted: increases are refused until seats are freed)"
                } else {
                    ""
                }
            );
        }
        BackendCommand::Audit {
            output: AuditFormat::Csv,
        } => {
            // A page at a time, as the server streams its own: never the
            // whole log in memory.
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let written = |r: std::io::Result<()>| r.map_err(|e| format!("writing the CSV: {e}"));
            written(out.write_all(&audit_csv::header()))?;
            let mut after = 0;
            loop {
                let page = backend.audit_page(after, 1000).await.map_err(err)?;
                let Some(last) = page.last() else { break };
                after = last.id;
                written(out.write_all(&audit_csv::rows(&page)))?;
            }
        }
        BackendCommand::Audit { output } => {
            let entries = backend.audit().await.map_err(err)?;
            match output {
                AuditFormat::Json => {
                    let s = serde_json::to_string_pretty(&entries).map_err(|e| e.to_string())?;
                    println!("{s}");
                }
                AuditFormat::Markdown => print!("{}", render::audit_markdown(&entries)),
                // Text (CSV is streamed above).
                _ => print!("{}", render::audit_text(&entries)),
            }
        }
    }
    Ok(())
}

/// `backend seed`: the fixture is read and checked before any store is
/// opened, and a store file this seed created is removed again when the
/// seed fails, so a bad fixture leaves nothing behind.
async fn seed(g: &Global, file: &std::path::Path) -> Result<(), String> {
    let (text, shown) = if file.as_os_str() == "-" {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
            .map_err(|e| format!("standard input: {e}"))?;
        (text, "standard input".to_string())
    } else {
        let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
        (text, file.display().to_string())
    };
    let fixture: Fixture = serde_yaml::from_str(&text).map_err(|e| format!("{shown}: {e}"))?;
    let new_file = super::new_store_file(&g.backend);
    let seeded = async {
        let backend = open_backend(g, Open::Create)?;
        backend.seed(&fixture).await.map_err(|e| e.to_string())
    }
    .await;
    match (seeded, new_file) {
        (Ok(()), _) => {
            println!(
                "seeded account {}: {} products, {} organizations",
                fixture.account,
                fixture.products.len(),
                fixture.organizations.len()
            );
            Ok(())
        }
        (Err(e), Some(path)) => {
            super::remove_store_file(&path);
            Err(e)
        }
        (Err(e), None) => Err(e),
    }
}

/// `backend copy`: every account of `from` (or the one `--account` names).
/// Store calls block, so the copy runs on a thread of its own.
fn copy(g: &Global, from: &str, to: &str, replace: bool) -> Result<(), String> {
    std::thread::scope(|s| {
        s.spawn(|| {
            let source = open_store_at(from, Open::Existing)?;
            let target = open_store_at(to, Open::Create)?;
            let accounts = match &g.account {
                Some(a) => vec![source.resolve_account(Some(a)).map_err(|e| e.to_string())?],
                None => source.accounts().map_err(|e| e.to_string())?,
            };
            for account in &accounts {
                source
                    .copy_account(account, &target, replace)
                    .map_err(|e| e.to_string())?;
                println!(
                    "copied account {account} from {} to {}",
                    source.describe(),
                    target.describe()
                );
            }
            Ok(())
        })
        .join()
        .unwrap_or_else(|_| Err("the copy failed".into()))
    })
}
