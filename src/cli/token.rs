//! `licensor token create`: API tokens of a store (the embedded file or
//! PostgreSQL), stored hashed.

use clap::Subcommand;

use super::{FAILED, Global, OK, Open, open_store};
use crate::domain::Role;

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Create a token for one account and role; it is printed once.
    Create {
        /// AccountAdmin (may change allocations and totals) or Viewer
        /// (reads only).
        #[arg(long, value_parser = role)]
        role: Role,
        /// A name for the audit log (who holds the token).
        #[arg(long)]
        name: String,
    },
}

pub fn run(g: &Global, command: TokenCommand) -> u8 {
    let TokenCommand::Create { role, name } = command;
    // Store calls block (PostgreSQL's on a runtime of its own): off this one.
    let result = std::thread::scope(|s| {
        s.spawn(|| {
            let store = open_store(g, Open::Create)?;
            let account = store
                .resolve_account(g.account.as_deref())
                .map_err(|e| e.to_string())?;
            store
                .create_token(&account, role, &name)
                .map_err(|e| e.to_string())
        })
        .join()
        .unwrap_or_else(|_| Err("the token could not be created".into()))
    });
    match result {
        Ok(token) => {
            println!("{token}");
            OK
        }
        Err(e) => {
            eprintln!("error: {e}");
            FAILED
        }
    }
}

/// `--role`: a role as the store and the API spell it.
fn role(s: &str) -> Result<Role, String> {
    Role::parse(s).ok_or_else(|| format!("{s:?} is no role; AccountAdmin or Viewer"))
}
