//! Tenants: which namespace may ask for which licenses of an account
//! (DESIGN §9; R1 in a cluster shared by teams). Pure: the webhook, the
//! reconcile pass and `licensor plan` all call [`Tenants::allow`], so they
//! cannot disagree.
//!
//! An account with no tenants lets every namespace manage every
//! organization. Otherwise an object in namespace N may manage organization
//! O, product P with count C when one tenant entry matches N (by name, or by
//! the Namespace's labels), O matches one of its `organizations` (exact ids
//! or globs, where `*` is any run of characters), P is among its `products`
//! (when given) and C is at most its `maxCount` (when given). Anything else
//! is `Forbidden`, and the message names the namespace, the organization,
//! the account and what its tenants allow.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::{MAX_COUNT, Reason, Refusal, check_identifier};

/// One tenant entry of an account.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Tenant {
    /// Namespaces this entry is for, by exact name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// Namespaces this entry is for, by the labels of their Namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<Selector>,
    /// Organizations these namespaces may manage: exact ids, or globs where
    /// `*` stands for any run of characters (`qa-*`). Required, not empty.
    #[schemars(length(min = 1))]
    pub organizations: Vec<String>,
    /// Products they may manage; absent: every product.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub products: Option<Vec<String>>,
    /// The largest spec.count one object may ask for, 0 to 1000000;
    /// absent: no ceiling but the pool's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1_000_000))]
    pub max_count: Option<i64>,
}

/// A label selector, as Kubernetes writes one: every label of matchLabels
/// and every requirement of matchExpressions must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Selector {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<Requirement>,
}

/// One requirement of a label selector.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Requirement {
    pub key: String,
    pub operator: Operator,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

/// How a requirement compares a label: In, NotIn (with values), Exists,
/// DoesNotExist (without).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

impl Selector {
    /// Whether a Namespace with `labels` is selected. An empty selector
    /// selects every namespace, as in Kubernetes.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| {
                let value = labels.get(&r.key);
                match r.operator {
                    Operator::In => value.is_some_and(|v| r.values.contains(v)),
                    Operator::NotIn => value.is_none_or(|v| !r.values.contains(v)),
                    Operator::Exists => value.is_some(),
                    Operator::DoesNotExist => value.is_none(),
                }
            })
    }

    fn describe(&self) -> String {
        let mut parts: Vec<String> = self
            .match_labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        for r in &self.match_expressions {
            parts.push(match r.operator {
                Operator::In => format!("{} in ({})", r.key, r.values.join(", ")),
                Operator::NotIn => format!("{} notin ({})", r.key, r.values.join(", ")),
                Operator::Exists => r.key.clone(),
                Operator::DoesNotExist => format!("!{}", r.key),
            });
        }
        parts.join(",")
    }
}

/// Whether `id` matches `pattern`, where `*` is any run of characters
/// (the empty one too) and every other character stands for itself.
pub fn glob_matches(pattern: &str, id: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = id.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// Who asks: a namespace and the labels of its Namespace object.
#[derive(Debug, Clone, Copy)]
pub struct Asker<'a> {
    pub namespace: &'a str,
    pub labels: &'a BTreeMap<String, String>,
}

/// What is asked for.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    pub organization: &'a str,
    pub product: &'a str,
    pub count: i64,
}

impl Tenant {
    fn selects(&self, who: Asker<'_>) -> bool {
        self.namespaces.iter().any(|n| n == who.namespace)
            || self
                .namespace_selector
                .as_ref()
                .is_some_and(|s| s.matches(who.labels))
    }

    fn allows(&self, ask: Ask<'_>) -> bool {
        self.organizations
            .iter()
            .any(|p| glob_matches(p, ask.organization))
            && self
                .products
                .as_ref()
                .is_none_or(|ps| ps.iter().any(|p| p == ask.product))
            && self.max_count.is_none_or(|max| ask.count <= max)
    }

    /// What this entry allows, for a refusal's message.
    fn describe(&self) -> String {
        let mut out = format!("organizations {}", self.organizations.join(", "));
        if let Some(products) = &self.products {
            let _ = write!(out, "; products {}", products.join(", "));
        }
        if let Some(max) = self.max_count {
            let _ = write!(out, "; count up to {max}");
        }
        out
    }

    /// Which namespaces this entry is for, for a refusal's message.
    fn describe_namespaces(&self) -> String {
        let mut whom: Vec<String> = self.namespaces.clone();
        if let Some(s) = &self.namespace_selector {
            whom.push(format!("labels {{{}}}", s.describe()));
        }
        whom.join(" or ")
    }

    /// Checks one entry as written: it names namespaces, its organizations
    /// are ids or globs of them, its ceiling is a count.
    fn check(&self, at: usize) -> Result<(), String> {
        let entry = format!("tenants[{at}]");
        if self.namespaces.is_empty() && self.namespace_selector.is_none() {
            return Err(format!(
                "{entry}: names no namespace; give namespaces, a namespaceSelector, or both"
            ));
        }
        if self.organizations.is_empty() {
            return Err(format!(
                "{entry}: organizations is empty; list the ids (or globs such as qa-*) this tenant may manage"
            ));
        }
        for pattern in &self.organizations {
            // A glob is an id with `*` in places: what is left once the
            // stars are taken out must be the parts of an id.
            let literal = pattern.replace('*', "");
            if pattern.contains("**") || pattern.chars().any(|c| matches!(c, '?' | '[' | ']')) {
                return Err(format!(
                    "{entry}: organization pattern {pattern:?} is not a glob licensor reads: only * (any run of characters) is special"
                ));
            }
            if !literal.is_empty() {
                check_identifier("organization", &literal).map_err(|r| {
                    format!("{entry}: organization pattern {pattern:?}: {}", r.message)
                })?;
            }
        }
        for product in self.products.iter().flatten() {
            check_identifier("product", product).map_err(|r| format!("{entry}: {}", r.message))?;
        }
        if let Some(max) = self.max_count
            && !(0..=MAX_COUNT).contains(&max)
        {
            return Err(format!(
                "{entry}: maxCount {max} is outside 0..={MAX_COUNT}"
            ));
        }
        for r in self
            .namespace_selector
            .iter()
            .flat_map(|s| &s.match_expressions)
        {
            let needs_values = matches!(r.operator, Operator::In | Operator::NotIn);
            if needs_values == r.values.is_empty() {
                return Err(format!(
                    "{entry}: namespaceSelector {:?} {:?} {}",
                    r.key,
                    r.operator,
                    if needs_values {
                        "needs values"
                    } else {
                        "takes no values"
                    }
                ));
            }
        }
        Ok(())
    }
}

/// An account's tenants.
#[derive(Debug, Clone, Copy)]
pub struct Tenants<'a> {
    pub account: &'a str,
    pub entries: &'a [Tenant],
}

impl Tenants<'_> {
    /// Checks every entry as written (see [`Tenant`]); the first fault.
    pub fn check(&self) -> Result<(), String> {
        self.entries
            .iter()
            .enumerate()
            .try_for_each(|(i, t)| t.check(i))
    }

    /// Whether `who` may ask for `ask` on this account: `Forbidden`
    /// otherwise, naming the namespace, the organization, the account and
    /// what its tenants allow that namespace.
    pub fn allow(&self, who: Asker<'_>, ask: Ask<'_>) -> Result<(), Refusal> {
        if self.entries.is_empty() {
            return Ok(());
        }
        let mine: Vec<&Tenant> = self.entries.iter().filter(|t| t.selects(who)).collect();
        if mine.iter().any(|t| t.allows(ask)) {
            return Ok(());
        }
        let (namespace, account) = (who.namespace, self.account);
        let asked = format!(
            "namespace {namespace} may not manage {} {} licenses for organization {} on account {account}",
            ask.count, ask.product, ask.organization
        );
        let message = if mine.is_empty() {
            let tenants: Vec<String> = self
                .entries
                .iter()
                .map(Tenant::describe_namespaces)
                .collect();
            format!(
                "{asked}: it is none of the account's tenants ({}); ask the cluster's admins to add it to LicenseAccount {account}",
                tenants.join("; ")
            )
        } else {
            let allowed: Vec<String> = mine.iter().map(|t| t.describe()).collect();
            format!("{asked}: its tenant entries allow {}", allowed.join(" | "))
        };
        Err(Refusal::new(Reason::Forbidden, message))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn tenants() -> Vec<Tenant> {
        serde_yaml::from_str(
            "
- namespaces: [qa]
  organizations: [qa-team, 'qa-*']
  products: [TestOps]
  maxCount: 50
- namespaceSelector: {matchLabels: {team: dev}}
  organizations: [dev-team]
",
        )
        .unwrap()
    }

    fn ask<'a>(organization: &'a str, product: &'a str, count: i64) -> Ask<'a> {
        Ask {
            organization,
            product,
            count,
        }
    }

    #[test]
    fn globs_match_any_run_of_characters_and_nothing_else() {
        for (pattern, id, yes) in [
            ("qa-*", "qa-team", true),
            ("qa-*", "qa-", true),
            ("qa-*", "qa", false),
            ("*", "", true),
            ("*-team", "dev-team", true),
            ("*-team", "dev-teams", false),
            ("a*b*c", "abc", true),
            ("a*b*c", "aXbYc", true),
            ("a*b*c", "acb", false),
            ("ab*ba", "aba", false),
            ("qa-team", "qa-team", true),
            ("qa-team", "qa-teams", false),
        ] {
            assert_eq!(glob_matches(pattern, id), yes, "{pattern} ~ {id}");
        }
    }

    #[test]
    fn no_tenants_allow_everything() {
        let t = Tenants {
            account: "acme",
            entries: &[],
        };
        let who = Asker {
            namespace: "any",
            labels: &BTreeMap::new(),
        };
        assert!(t.allow(who, ask("dev-team", "Studio", 1_000_000)).is_ok());
    }

    #[test]
    fn a_namespace_may_ask_only_what_its_entries_allow() {
        let entries = tenants();
        let t = Tenants {
            account: "acme",
            entries: &entries,
        };
        let none = BTreeMap::new();
        let qa = Asker {
            namespace: "qa",
            labels: &none,
        };
        let dev_labels = labels(&[("team", "dev")]);
        let dev = Asker {
            namespace: "dev-ns",
            labels: &dev_labels,
        };
        assert!(t.allow(qa, ask("qa-team", "TestOps", 50)).is_ok());
        assert!(t.allow(qa, ask("qa-perf", "TestOps", 1)).is_ok());
        assert!(t.allow(dev, ask("dev-team", "Studio", 500)).is_ok());
        for (who, what) in [
            (qa, ask("dev-team", "TestOps", 1)),
            (qa, ask("qa-team", "Studio", 1)),
            (qa, ask("qa-team", "TestOps", 51)),
            (dev, ask("qa-team", "TestOps", 1)),
        ] {
            let refusal = t.allow(who, what).unwrap_err();
            assert_eq!(refusal.reason, Reason::Forbidden);
            for named in [who.namespace, what.organization, "acme"] {
                assert!(refusal.message.contains(named), "{}", refusal.message);
            }
        }
        let err = t.allow(qa, ask("dev-team", "TestOps", 1)).unwrap_err();
        assert_eq!(
            err.message,
            "namespace qa may not manage 1 TestOps licenses for organization dev-team on account acme: its tenant entries allow organizations qa-team, qa-*; products TestOps; count up to 50"
        );
        let stranger = Asker {
            namespace: "web",
            labels: &none,
        };
        assert_eq!(
            t.allow(stranger, ask("web-team", "TestOps", 1))
                .unwrap_err()
                .message,
            "namespace web may not manage 1 TestOps licenses for organization web-team on account acme: it is none of the account's tenants (qa; labels {team=dev}); ask the cluster's admins to add it to LicenseAccount acme"
        );
    }

    #[test]
    fn selectors_read_as_kubernetes_reads_them() {
        let selector: Selector = serde_yaml::from_str(
            "{matchLabels: {team: qa}, matchExpressions: [{key: tier, operator: In, values: [gold, silver]}, {key: frozen, operator: DoesNotExist}]}",
        )
        .unwrap();
        assert!(selector.matches(&labels(&[("team", "qa"), ("tier", "gold")])));
        assert!(!selector.matches(&labels(&[("team", "qa"), ("tier", "bronze")])));
        assert!(!selector.matches(&labels(&[("team", "qa"), ("tier", "gold"), ("frozen", "")])));
        assert!(!selector.matches(&labels(&[("tier", "gold")])));
        assert!(Selector::default().matches(&BTreeMap::new()));
    }

    #[test]
    fn malformed_entries_are_named() {
        for (yaml, fault) in [
            (
                "[{namespaces: [qa], organizations: []}]",
                "organizations is empty",
            ),
            ("[{organizations: [qa]}]", "names no namespace"),
            (
                "[{namespaces: [qa], organizations: ['qa-?']}]",
                "is not a glob",
            ),
            (
                "[{namespaces: [qa], organizations: ['qa-**']}]",
                "is not a glob",
            ),
            (
                "[{namespaces: [qa], organizations: [qa], maxCount: -1}]",
                "maxCount -1",
            ),
            (
                "[{namespaceSelector: {matchExpressions: [{key: team, operator: In}]}, organizations: [qa]}]",
                "needs values",
            ),
            (
                "[{namespaces: [qa], organizations: ['qa *']}]",
                "organization pattern",
            ),
        ] {
            let entries: Vec<Tenant> = serde_yaml::from_str(yaml).unwrap();
            let err = Tenants {
                account: "acme",
                entries: &entries,
            }
            .check()
            .unwrap_err();
            assert!(
                err.contains(fault) && err.starts_with("tenants[0]"),
                "{yaml}: {err}"
            );
        }
        let good = tenants();
        assert_eq!(
            Tenants {
                account: "acme",
                entries: &good
            }
            .check(),
            Ok(())
        );
    }
}
