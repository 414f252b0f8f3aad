//! `licensor token create`: API tokens of the embedded store, stored hashed.

use clap::Subcommand;

use super::{FAILED, Global, OK, sqlite_path};
use crate::backend::store::Store;
use crate::domain::Role;

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Create a token for one account and role; it is printed once.
    Create {
        /// AccountAdmin or Viewer.
        #[arg(long, value_parser = ["AccountAdmin", "Viewer"])]
        role: String,
        /// A name for the audit log (who holds the token).
        #[arg(long)]
        name: String,
    },
}

pub fn run(g: &Global, command: TokenCommand) -> u8 {
    let TokenCommand::Create { role, name } = command;
    let result = sqlite_path(g).and_then(|path| {
        let store = Store::open(&path).map_err(|e| e.to_string())?;
        let account = store
            .resolve_account(g.account.as_deref())
            .map_err(|e| e.to_string())?;
        let role = Role::parse(&role).unwrap_or(Role::Viewer);
        store
            .create_token(&account, role, &name)
            .map_err(|e| e.to_string())
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
