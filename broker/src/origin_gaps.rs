//! Which hosts an edge's origin table routes otherwise than the registry.
//!
//! An edge that refuses the pushed table for good (a token rotated on one side, a table over
//! its size limit, a field it does not know at the top of the body) routes by the table it
//! last took. For most hosts that is still the registry's route, and holding the whole edge
//! out of routing would move every edge's traffic at once when the refusal is fleet-wide. But
//! a host registered since, or deleted and registered again by another provider with another
//! origin, would be fetched from the wrong place (or not at all): those hosts, and only those,
//! are kept off the edge ([`crate::routing::Health::set_hosts_off`]) until it takes a table.
//! Rows an edge leaves out of a table it takes (a name it cannot resolve, a private address)
//! keep their hosts off it the same way.

use std::collections::{BTreeSet, HashMap, HashSet};

use edge_node::config::{OriginEntry, ORIGIN_ENTRY_FIELDS};
use serde_json::Value;

/// A row in a form both sides of a comparison agree on: its fields as an [`OriginEntry`] (so
/// defaults and field order do not matter), leaving out fields this build does not know (a
/// newer edge's, which it reports and this broker never sends); `None` when the row is not one.
fn canonical(row: &Value) -> Option<(String, String)> {
    let mut row = row.as_object()?.clone();
    row.retain(|k, _| ORIGIN_ENTRY_FIELDS.contains(&k.as_str()));
    let entry: OriginEntry = serde_json::from_value(Value::Object(row)).ok()?;
    let text = serde_json::to_string(&entry).ok()?;
    Some((entry.host, text))
}

/// A table's rows by host: each host's canonical rows as one hash, small enough to keep per
/// edge ([`crate::taken_tables`]) and to compare tables by.
pub type HostRows = HashMap<String, u64>;

/// The rows of a table by host ([`HostRows`]).
pub fn host_rows(rows: &[Value]) -> HostRows {
    let mut hosts: HashMap<String, BTreeSet<String>> = HashMap::new();
    for (host, text) in rows.iter().filter_map(canonical) {
        hosts.entry(host).or_default().insert(text);
    }
    hosts
        .into_iter()
        .map(|(host, rows)| {
            let mut hasher = xxhash_rust::xxh3::Xxh3::new();
            for row in rows {
                hasher.update(row.as_bytes());
                hasher.update(b"\n");
            }
            (host, hasher.digest())
        })
        .collect()
}

/// The hosts of `current` (the broker's table) whose rows differ from those of `held` (the
/// table an edge holds): changed, added or removed in part. Hosts the edge holds that the
/// registry no longer has are left out: the broker does not route them.
pub fn differing(current: &HostRows, held: &HostRows) -> HashSet<String> {
    current
        .iter()
        .filter(|(host, rows)| held.get(*host) != Some(rows))
        .map(|(host, _)| host.clone())
        .collect()
}

/// Whether an edge's answer to a push says it applied none of it (a rejected row naming no
/// host): its old table stays in force, as after a refusal.
pub fn not_applied(rejected: &Value) -> bool {
    rejected
        .as_array()
        .is_some_and(|rows| rows.iter().any(|r| r["host"].as_str() == Some("")))
}

/// The hosts of the rows an edge reports it left out of a push (`rejected` of its answer).
pub fn rejected_hosts(rejected: &Value) -> HashSet<String> {
    rejected
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter_map(|r| r["host"].as_str())
        .filter(|h| !h.is_empty())
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Only the hosts whose rows changed, were added or lost one differ; a row written with
    /// its defaults spelled out, or a field of a newer edge, is the same row.
    #[test]
    fn hosts_differ_only_where_their_rows_do() {
        let current = [
            json!({ "host": "same.test", "upstream": "http://a:80" }),
            json!({ "host": "moved.test", "upstream": "http://new:80", "registered_at_ms": 9 }),
            json!({ "host": "added.test", "upstream": "http://c:80" }),
            json!({ "host": "split.test", "upstream": "http://d:80" }),
            json!({ "host": "split.test", "path_prefix": "/api", "upstream": "http://e:80" }),
            json!({ "host": "again.test", "upstream": "http://g:80", "registered_at_ms": 20 }),
            json!({ "host": "option.test", "upstream": "http://h:80", "strip_set_cookie": true }),
        ];
        let held = [
            json!({ "host": "same.test", "upstream": "http://a:80", "forward_host": false,
                    "some_newer_option": true }),
            json!({ "host": "moved.test", "upstream": "http://old:80", "registered_at_ms": 3 }),
            json!({ "host": "split.test", "upstream": "http://d:80" }),
            json!({ "host": "gone.test", "upstream": "http://f:80" }),
            // Registered again, by the same or another provider, at the same upstream.
            json!({ "host": "again.test", "upstream": "http://g:80", "registered_at_ms": 10 }),
            json!({ "host": "option.test", "upstream": "http://h:80" }),
        ];
        let (current, held) = (host_rows(&current), host_rows(&held));
        let mut off: Vec<String> = differing(&current, &held).into_iter().collect();
        off.sort();
        assert_eq!(
            off,
            [
                "added.test",
                "again.test",
                "moved.test",
                "option.test",
                "split.test"
            ]
        );
        assert!(differing(&current, &current).is_empty());
    }

    #[test]
    fn rejected_rows_name_their_hosts() {
        let rejected = json!([
            { "index": 0, "host": "a.test", "error": "private" },
            { "index": 3, "host": "", "error": "push not applied" },
        ]);
        let hosts = rejected_hosts(&rejected);
        assert_eq!(hosts, HashSet::from(["a.test".to_string()]));
        assert!(rejected_hosts(&Value::Null).is_empty());
        assert!(not_applied(&rejected));
        assert!(!not_applied(&json!([{ "index": 0, "host": "a.test" }])));
        assert!(!not_applied(&Value::Null));
    }
}
