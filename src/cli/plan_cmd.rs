//! `licensor plan` and `licensor apply`: manifests -> plan -> (apply) -> report.

use clap::Args;

use super::render::{self, Mode};
use super::{CHANGES, FAILED, Files, Format, Global, OK, desired, load_manifests, observe};
use crate::apply::execute;
use crate::domain::{Ledger, Role};
use crate::manifest::Manifest;
use crate::plan::{Options, Plan, plan_on};

#[derive(Args, Debug)]
pub struct PlanArgs {
    #[command(flatten)]
    pub files: Files,
    /// Also remove allocations this instance manages that no manifest names,
    /// as deleting their objects would: revoke, or orphan where their
    /// manifest said deletionPolicy: Orphan.
    #[arg(long)]
    pub prune: bool,
    /// The LicenseAccount the backend is: manifests naming another account
    /// that the inputs declare are left to that account's run, with a note.
    #[arg(long, default_value = crate::licenseaccount::DEFAULT_ACCOUNT, value_name = "NAME")]
    pub account_ref: String,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value = "text")]
    pub output: Format,
}

/// `licensor plan`: [`PlanArgs`] and the moment to plan for.
#[derive(Args, Debug)]
pub struct PreviewArgs {
    #[command(flatten)]
    pub plan: PlanArgs,
    /// Plan for another moment (RFC 3339, for example
    /// 2027-01-31T18:00:00Z): temporary allocations whose until has come by
    /// then are planned at their thenCount. Default: now.
    #[arg(long, value_name = "TIME")]
    pub at: Option<chrono::DateTime<chrono::Utc>>,
}

const _: () = assert!(
    crate::plan::builds_in_place::<Manifest>(),
    "a step is made in the slot of the manifest it comes from"
);

/// A plan, the account booked with its changes, and the backend read.
struct Prepared {
    plan: Plan,
    ledger: Ledger,
    backend: Box<dyn crate::backend::Backend>,
}

/// Loads, observes and plans; prints the error and returns `None` on failure.
async fn prepare(
    g: &Global,
    args: &PlanArgs,
    mode: Mode,
    now: chrono::DateTime<chrono::Utc>,
) -> Option<Prepared> {
    let (mut manifests, directory) = load_manifests(&args.files)?;
    // A manifest of another account the inputs declare is that account's;
    // one naming an account that is not there is planned, and refused for
    // it.
    manifests.retain(|m| {
        let account = m.spec.account();
        let elsewhere = account != args.account_ref && directory.accounts.contains_key(account);
        if elsewhere {
            eprintln!(
                "note: {}: {} is for LicenseAccount {account}, planned with --account-ref {account}",
                m.source,
                m.resource()
            );
        }
        !elsewhere
    });
    let (backend, snapshot) = observe(g).await.map_err(|e| eprintln!("error: {e}")).ok()?;
    let opts = Options {
        prune: args.prune,
        instance: g.instance.clone(),
        // The backend enforces R1 on every write; the plan assumes the
        // caller may write so that it shows the changes themselves.
        role: Role::AccountAdmin,
        keep_writes: mode == Mode::Apply,
        now,
    };
    let mut ledger = Ledger::from(snapshot);
    // Each manifest becomes its desired resource as it is planned, and its
    // step takes its slot: the plan touches no other buffer of 100,000
    // (the first touch of two made fresh was a twentieth of what plan
    // adds to reading).
    let asked = manifests
        .into_iter()
        .map(|m| desired(m, &g.instance, &directory));
    let plan = plan_on(asked, &mut ledger, &opts);
    Some(Prepared {
        plan,
        ledger,
        backend,
    })
}

pub async fn plan(g: &Global, preview: &PreviewArgs) -> u8 {
    let args = &preview.plan;
    let now = preview.at.unwrap_or_else(chrono::Utc::now);
    let Some(Prepared {
        plan,
        ledger,
        backend,
    }) = prepare(g, args, Mode::Plan, now).await
    else {
        return FAILED;
    };
    render::print_plan(&plan, args.output, Mode::Plan, &backend.location());
    let code = if plan.has_errors() {
        FAILED
    } else if plan.has_changes() {
        CHANGES
    } else {
        OK
    };
    // The process ends with this command and its memory goes back at once:
    // freeing 100,000 changes one by one first cost a seventh of planning,
    // and the account's 100,000 allocations, with the allocator's tidying
    // after them, a sixth.
    std::mem::forget(plan);
    std::mem::forget(ledger);
    code
}

pub async fn apply(g: &Global, args: &PlanArgs) -> u8 {
    let Some(Prepared {
        mut plan, backend, ..
    }) = prepare(g, args, Mode::Apply, chrono::Utc::now()).await
    else {
        return FAILED;
    };
    if let Err(e) = execute(&mut plan, backend.as_ref()).await {
        eprintln!("error: reading the backend after apply: {e}");
        render::print_plan(&plan, args.output, Mode::Apply, &backend.location());
        return FAILED;
    }
    render::print_plan(&plan, args.output, Mode::Apply, &backend.location());
    if plan.has_errors() { FAILED } else { OK }
}
