//! The dashboard's cluster view (docs/dashboard.md, "Cluster"): what every node shares for it
//! and the one pipeline that reads it back.
//!
//! Sans-IO: builders return commands, `parse` takes their replies. Each node's shard 0 writes
//! its totals with the `connections` script of `cluster::limits` (one `count:ms` entry per node
//! in a hash, entries not refreshed within the window dropped), next to the per-app `…:conns`
//! hashes that `max_connections` already uses; the serving node reads the leases, Redis's
//! clock and those hashes in one round trip. Only nodes with a live lease in `P:nodes` are
//! shown, so a dead node's last entries never count.

use std::collections::HashMap;

use serde_json::{json, Value};

use super::commands::Command;
use super::link::Reply;
use super::scripts::{self, scripts};
use super::NodeIdentity;

/// The node totals shared for the dashboard, each a hash of `node → count:ms`.
pub const NODE_TOTALS: [&str; 3] = ["connections", "messages_in_total", "messages_out_total"];

/// `P:dashboard:{total}`: the hash of one node total.
fn totals_key(prefix: &str, total: &str) -> String {
    format!("{prefix}:dashboard:{total}")
}

/// The `EVALSHA`s that write this node's totals (`values` in `NODE_TOTALS` order); entries older
/// than `stale_ms` are dropped by the script.
pub fn share_totals(prefix: &str, node: &NodeIdentity, values: [u64; 3], stale_ms: u64) -> Vec<Command> {
    let (node, stale_ms) = (scripts::node_name(node), stale_ms.to_string());
    NODE_TOTALS
        .iter()
        .zip(values)
        .map(|(total, value)| {
            let value = value.to_string();
            let args: [&[u8]; 3] = [node.as_bytes(), value.as_bytes(), stale_ms.as_bytes()];
            scripts().connections.call(&[&totals_key(prefix, total)], &args)
        })
        .collect()
}

/// The read, one pipeline: `TIME`, the leases, the node totals, then each app's `…:conns`.
pub fn read(prefix: &str, app_ids: &[&str]) -> Vec<Command> {
    let (nodes, _) = scripts::leases(prefix);
    let mut commands = vec![
        vec![b"TIME".to_vec()],
        vec![b"ZRANGE".to_vec(), nodes.into_bytes(), b"0".to_vec(), b"-1".to_vec(), b"WITHSCORES".to_vec()],
    ];
    for total in NODE_TOTALS {
        commands.push(vec![b"HGETALL".to_vec(), totals_key(prefix, total).into_bytes()]);
    }
    for app_id in app_ids {
        commands.push(vec![b"HGETALL".to_vec(), format!("{prefix}:a:{app_id}:conns").into_bytes()]);
    }
    commands
}

/// One live node as the dashboard shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    /// `node_id/incarnation`, as in `P:nodes`.
    pub node: String,
    /// Milliseconds left on its lease (Redis time).
    pub lease_remaining_ms: u64,
    /// Its last shared totals, in `NODE_TOTALS` order (0 until its first share).
    pub totals: [u64; 3],
    /// When it last shared them (Redis time, ms; 0 until its first share): the page divides
    /// the message totals' deltas by this one's, since shares come every
    /// `cluster.connections_refresh_ms`, not at the page's polls.
    pub shared_ms: u64,
    /// Its last shared connections per app, in the order of the read's app ids.
    pub apps: Vec<u64>,
}

/// The replies of `read` as live nodes (sorted by name); a reason when a reply is not what
/// the commands answer (an error reply included), never a panic.
pub fn parse(replies: &[Reply], app_count: usize) -> Result<Vec<NodeView>, String> {
    if replies.len() != 2 + NODE_TOTALS.len() + app_count {
        return Err(format!("{} replies to {} commands", replies.len(), 2 + NODE_TOTALS.len() + app_count));
    }
    let now_ms = match array(&replies[0])?.as_slice() {
        [seconds, micros] => number(seconds)? * 1000 + number(micros)? / 1000,
        other => return Err(format!("TIME answered {other:?}")),
    };
    let mut nodes: Vec<NodeView> = pairs(&replies[1])?
        .into_iter()
        .filter_map(|(node, expiry)| {
            // Scores are integral milliseconds; a float in text ("1.7e12") is parsed as one.
            let expiry = expiry.parse::<f64>().ok()? as u64;
            (expiry > now_ms).then(|| NodeView {
                node,
                lease_remaining_ms: expiry - now_ms,
                totals: [0; 3],
                shared_ms: 0,
                apps: vec![0; app_count],
            })
        })
        .collect();
    nodes.sort_by(|a, b| a.node.cmp(&b.node));
    let mut index: HashMap<String, usize> = HashMap::new();
    for (i, node) in nodes.iter().enumerate() {
        index.insert(node.node.clone(), i);
    }
    for (total, reply) in replies[2..2 + NODE_TOTALS.len()].iter().enumerate() {
        for (node, count, at_ms) in counts(reply)? {
            if let Some(&i) = index.get(&node) {
                nodes[i].totals[total] = count;
                nodes[i].shared_ms = nodes[i].shared_ms.max(at_ms);
            }
        }
    }
    for (app, reply) in replies[2 + NODE_TOTALS.len()..].iter().enumerate() {
        for (node, count, _) in counts(reply)? {
            if let Some(&i) = index.get(&node) {
                nodes[i].apps[app] = count;
            }
        }
    }
    Ok(nodes)
}

/// The snapshot's `cluster` section of an available view: every node and the sums.
pub fn render(this_node: &str, nodes: &[NodeView], app_ids: &[&str]) -> Value {
    let apps_json = |counts: &mut dyn Iterator<Item = u64>| -> Value {
        app_ids.iter().zip(counts).map(|(id, count)| (id.to_string(), Value::from(count))).collect()
    };
    let node_json: Vec<Value> = nodes
        .iter()
        .map(|n| {
            let mut node = json!({
                "node": n.node,
                "this": n.node == this_node,
                "lease_remaining_ms": n.lease_remaining_ms,
                "shared_ms": n.shared_ms,
                "apps": apps_json(&mut n.apps.iter().copied()),
            });
            for (name, value) in NODE_TOTALS.iter().zip(n.totals) {
                node[*name] = value.into();
            }
            node
        })
        .collect();
    let mut sums = json!({
        "nodes": nodes.len(),
        "apps": apps_json(&mut (0..app_ids.len()).map(|a| nodes.iter().map(|n| n.apps[a]).sum())),
    });
    for (i, name) in NODE_TOTALS.iter().enumerate() {
        sums[*name] = nodes.iter().map(|n| n.totals[i]).sum::<u64>().into();
    }
    json!({ "available": true, "node": this_node, "nodes": node_json, "sums": sums })
}

fn array(reply: &Reply) -> Result<&Vec<Reply>, String> {
    match reply {
        Reply::Array(items) => Ok(items),
        other => Err(format!("expected an array, got {other:?}")),
    }
}

fn text(reply: &Reply) -> Result<String, String> {
    match reply {
        Reply::BulkString(bytes) | Reply::SimpleString(bytes) => {
            std::str::from_utf8(bytes).map(str::to_owned).map_err(|_| format!("not UTF-8: {bytes:?}"))
        }
        other => Err(format!("expected a string, got {other:?}")),
    }
}

fn number(reply: &Reply) -> Result<u64, String> {
    match reply {
        Reply::Integer(n) => u64::try_from(*n).map_err(|_| format!("negative: {n}")),
        other => text(other)?.parse().map_err(|_| format!("not a number: {other:?}")),
    }
}

/// A flat `[key, value, key, value, …]` array as pairs.
fn pairs(reply: &Reply) -> Result<Vec<(String, String)>, String> {
    let items = array(reply)?;
    if items.len() % 2 != 0 {
        return Err(format!("odd array of {} items", items.len()));
    }
    items.chunks(2).map(|pair| Ok((text(&pair[0])?, text(&pair[1])?))).collect()
}

/// A `node → count:ms` hash as (node, count, ms); malformed entries are skipped (the writers'
/// script deletes them at its next run).
fn counts(reply: &Reply) -> Result<Vec<(String, u64, u64)>, String> {
    Ok(pairs(reply)?
        .into_iter()
        .filter_map(|(node, value)| {
            let (count, at_ms) = value.split_once(':')?;
            Some((node, count.parse().ok()?, at_ms.parse().ok()?))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn bulk(s: &str) -> Reply {
        Reply::BulkString(Bytes::from(s.to_owned()))
    }

    fn hash(entries: &[(&str, &str)]) -> Reply {
        Reply::Array(entries.iter().flat_map(|(k, v)| [bulk(k), bulk(v)]).collect())
    }

    /// Only nodes with a live lease are listed, with their remaining lease, totals and per-app
    /// counts (absent entries are 0), and the sums add them up; malformed replies are reasons.
    #[test]
    fn parse_and_render() {
        let time = Reply::Array(vec![bulk("1000"), bulk("500000")]);
        let leases = hash(&[("b/2", "1001000"), ("a/1", "1003500"), ("dead/3", "999000")]);
        let connections = hash(&[("a/1", "3:1"), ("b/2", "4:1"), ("dead/3", "100:1"), ("x", "junk")]);
        let messages_in = hash(&[("a/1", "10:7")]);
        let messages_out = hash(&[]);
        let app = hash(&[("a/1", "2:1"), ("b/2", "4:1")]);
        let replies = [time, leases, connections, messages_in, messages_out, app];
        let nodes = parse(&replies, 1).unwrap();
        assert_eq!(
            nodes,
            [
                NodeView {
                    node: "a/1".into(),
                    lease_remaining_ms: 3000,
                    totals: [3, 10, 0],
                    shared_ms: 7,
                    apps: vec![2]
                },
                NodeView {
                    node: "b/2".into(),
                    lease_remaining_ms: 500,
                    totals: [4, 0, 0],
                    shared_ms: 1,
                    apps: vec![4]
                },
            ]
        );
        let view = render("b/2", &nodes, &["app-1"]);
        assert_eq!(
            view["sums"],
            json!({"nodes": 2, "connections": 7, "messages_in_total": 10, "messages_out_total": 0, "apps": {"app-1": 6}})
        );
        assert_eq!(view["nodes"][1]["this"], json!(true));
        assert_eq!(view["nodes"][0]["apps"], json!({"app-1": 2}));
        assert!(parse(&replies[..5], 1).is_err());
        let mut broken = replies.to_vec();
        broken[1] = Reply::Error("ERR wrong type".into());
        assert!(parse(&broken, 1).is_err());
    }

    /// The read names the prefix's keys; the share writes one entry per total under the node.
    #[test]
    fn commands() {
        let read = read("rw", &["app"]);
        assert_eq!(read.len(), 6);
        assert_eq!(read[1][1], b"rw:nodes");
        assert_eq!(read[4][1], b"rw:dashboard:messages_out_total");
        assert_eq!(read[5][1], b"rw:a:app:conns");
        let node = NodeIdentity { node_id: "n1".into(), incarnation: 1 };
        let share = share_totals("rw", &node, [1, 2, 3], 3000);
        assert_eq!(share[2][3], b"rw:dashboard:messages_out_total");
        assert_eq!(share[2][5], b"3");
    }
}
