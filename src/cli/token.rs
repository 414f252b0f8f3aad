//! `licensor token create | list | revoke`: API tokens of a store (the
//! embedded file or PostgreSQL), stored hashed, each with a name unique in
//! its account and an optional expiry (DESIGN §10). Creating, revoking and
//! expiring are audited; the actor is `local` (whoever can open the store).

use std::time::Duration;

use clap::Subcommand;

use super::{FAILED, Format, Global, OK, Open, open_store, render};
use crate::backend::store::{Principal, Store};
use crate::domain::Role;

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Create a token for one account and role; it is printed once.
    Create {
        /// AccountAdmin (may change allocations and totals) or Viewer
        /// (reads only).
        #[arg(long, value_parser = role)]
        role: Role,
        /// Who holds the token: unique in the account, shown in the audit
        /// log and by `token list`, and what `token revoke` takes.
        #[arg(long)]
        name: String,
        /// How long the token works (90d, 12h, 30m); without it, until
        /// revoked.
        #[arg(long, value_parser = humantime::parse_duration)]
        expires: Option<Duration>,
    },
    /// The account's tokens: name, role, created, expires, last used
    /// (never a token or its hash).
    List {
        /// text (a table) or json.
        #[arg(short = 'o', long = "output", value_enum, default_value = "text")]
        format: Format,
    },
    /// Revoke a token: refused from its next request on, on the API and the
    /// page, and its page sessions end.
    Revoke {
        #[arg(long)]
        name: String,
    },
}

pub fn run(g: &Global, command: TokenCommand) -> u8 {
    // Only `create` makes a store; the others read one that exists.
    let open = match command {
        TokenCommand::Create { .. } => Open::Create,
        _ => Open::Existing,
    };
    // Store calls block (PostgreSQL's on a runtime of its own): off this one.
    let result = std::thread::scope(|s| {
        s.spawn(|| {
            let store = open_store(g, open)?;
            let account = store
                .resolve_account(g.account.as_deref())
                .map_err(|e| e.to_string())?;
            act(&store, &account, command)
        })
        .join()
        .unwrap_or_else(|_| Err("the token command failed".into()))
    });
    match result {
        Ok(out) => {
            print!("{out}");
            OK
        }
        Err(e) => {
            eprintln!("error: {e}");
            FAILED
        }
    }
}

/// Does one token command; what it prints.
fn act(store: &Store, account: &str, command: TokenCommand) -> Result<String, String> {
    let actor = Principal::local().actor;
    let e = |e: &dyn std::fmt::Display| e.to_string();
    match command {
        TokenCommand::Create {
            role,
            name,
            expires,
        } => {
            store.expire_tokens().map_err(|x| e(&x))?;
            let token = store
                .create_token(account, role, &name, expires, &actor)
                .map_err(|x| e(&x))?;
            Ok(format!("{token}\n"))
        }
        TokenCommand::List { format } => {
            let tokens = store.list_tokens(account).map_err(|x| e(&x))?;
            Ok(match format {
                Format::Json => {
                    let mut out = serde_json::to_string_pretty(&tokens).map_err(|x| e(&x))?;
                    out.push('\n');
                    out
                }
                Format::Text => render::tokens_text(account, &tokens),
                Format::Markdown => render::tokens_markdown(account, &tokens),
            })
        }
        TokenCommand::Revoke { name } => {
            store
                .revoke_token(account, &name, &actor)
                .map_err(|x| e(&x))?;
            Ok(format!(
                "revoked token {name:?} of account {account}: refused from now on, its page sessions ended\n"
            ))
        }
    }
}

/// `--role`: a role as the store and the API spell it.
fn role(s: &str) -> Result<Role, String> {
    Role::parse(s).ok_or_else(|| format!("{s:?} is no role; AccountAdmin or Viewer"))
}
