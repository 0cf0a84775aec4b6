//! The meta group's state machine (group 0): the node registry and the
//! placement of every shard. Every node hosts a replica of it (the initial
//! nodes as voters), so any node can tell a router where a shard lives.

use natter_kv::{KvError, KvRead, KvResult, KvWrite, StateMachine};
use natter_proto::cluster::{
    meta_command::Op, MetaCommand, MetaResponse, NodeInfo, ShardMap, ShardPlacement,
};
use prost::Message;

const MAP_KEY: &[u8] = b"shard-map";

pub struct Meta;

fn load(kv: &dyn KvRead) -> KvResult<Option<ShardMap>> {
    match kv.get(MAP_KEY)? {
        None => Ok(None),
        Some(raw) => ShardMap::decode(raw.as_slice())
            .map(Some)
            .map_err(|e| KvError::Corrupt {
                key: MAP_KEY.to_vec(),
                reason: e.to_string(),
            }),
    }
}

fn reply(error: impl Into<String>, map: Option<ShardMap>) -> Vec<u8> {
    MetaResponse {
        error: error.into(),
        map,
        node_id: 0,
    }
    .encode_to_vec()
}

/// Longest node address or region label the registry accepts.
pub const MAX_LABEL: usize = 256;

/// Replicas the shards of `region` need: the largest replica set among them.
fn region_needs(map: &ShardMap, region: &str) -> usize {
    map.shards
        .iter()
        .filter(|s| s.region == region)
        .map(|s| s.replicas.len())
        .max()
        .unwrap_or(0)
}

/// Nodes of `region` that can hold replicas (registered, not draining),
/// leaving out `except`.
fn region_capacity(map: &ShardMap, region: &str, except: u64) -> usize {
    map.nodes
        .iter()
        .filter(|n| n.region == region && !n.draining && n.id != except)
        .count()
}

/// Shard `s` (1-based) gets `replicas` consecutive nodes starting at
/// position `s - 1`, so replicas and first choices spread evenly.
pub fn initial_placement(nodes: &[u64], shards: u32, replicas: usize) -> Vec<ShardPlacement> {
    let n = nodes.len();
    (1..=shards)
        .map(|shard| {
            let mut r: Vec<u64> = (0..replicas.min(n))
                .map(|i| nodes[(shard as usize - 1 + i) % n])
                .collect();
            r.sort_unstable();
            ShardPlacement {
                shard,
                replicas: r,
                region: String::new(),
            }
        })
        .collect()
}

/// The node that initializes shard `s` (1-based) of a new cluster, and so
/// becomes its first leader: its first choice in [`initial_placement`],
/// before the replica list is sorted. Leaderships start spread evenly, so
/// the rebalancer has none to move (each move stalls the shard's writes for
/// up to a leader lease).
pub fn first_choice(nodes: &[u64], shard: u32) -> Option<u64> {
    if nodes.is_empty() || shard == 0 {
        return None;
    }
    nodes.get((shard as usize - 1) % nodes.len()).copied()
}

impl Meta {
    fn apply_op(kv: &mut dyn KvWrite, op: Op) -> KvResult<Vec<u8>> {
        let current = load(kv)?;
        let mut map = match (op, current) {
            (Op::Init(init), None) => {
                if init.shard_count == 0 || init.shards.len() != init.shard_count as usize {
                    return Ok(reply("init: shard count and placements disagree", None));
                }
                init
            }
            (Op::Init(init), Some(existing)) => {
                let err = if init.shard_count == existing.shard_count {
                    ""
                } else {
                    "cluster already initialized with another shard count"
                };
                return Ok(reply(err, Some(existing)));
            }
            (_, None) => return Ok(reply("cluster not initialized", None)),
            (Op::RegisterNode(node), Some(mut map)) => {
                if node.id == 0 || node.addr.is_empty() {
                    return Ok(reply("node id and address are required", Some(map)));
                }
                match map.nodes.iter_mut().find(|n| n.id == node.id) {
                    Some(existing) => *existing = node,
                    None if node.id <= map.max_node_id => {
                        return Ok(reply(
                            format!("node id {} was used before; ids are never reused", node.id),
                            Some(map),
                        ))
                    }
                    None => {
                        map.max_node_id = node.id;
                        map.nodes.push(node);
                        map.nodes.sort_by_key(|n: &NodeInfo| n.id);
                    }
                }
                map
            }
            (Op::SetPlacement(p), Some(mut map)) => {
                let known = |id: &u64| map.nodes.iter().any(|n| n.id == *id);
                if !p.replicas.iter().all(known) {
                    return Ok(reply("placement names an unknown node", Some(map)));
                }
                let mut unique = p.replicas.clone();
                unique.sort_unstable();
                unique.dedup();
                if unique.len() != p.replicas.len() || unique.is_empty() {
                    return Ok(reply(
                        "a placement needs at least one replica and never two on one node",
                        Some(map),
                    ));
                }
                let Some(region) = map
                    .shards
                    .iter()
                    .find(|s| s.shard == p.shard)
                    .map(|s| s.region.clone())
                else {
                    return Ok(reply(format!("no shard {}", p.shard), Some(map)));
                };
                let in_region = |id: &u64| {
                    map.nodes
                        .iter()
                        .any(|n| n.id == *id && (region.is_empty() || n.region == region))
                };
                if !unique.iter().all(in_region) {
                    return Ok(reply(
                        format!("shard {} must stay in region {region:?}", p.shard),
                        Some(map),
                    ));
                }
                if let Some(s) = map.shards.iter_mut().find(|s| s.shard == p.shard) {
                    s.replicas = unique;
                }
                map
            }
            (Op::Join(node), Some(mut map)) => {
                if node.addr.is_empty()
                    || node.addr.len() > MAX_LABEL
                    || node.region.is_empty()
                    || node.region.len() > MAX_LABEL
                {
                    return Ok(reply(
                        "join: an address and a region (at most 256 bytes each) are required",
                        Some(map),
                    ));
                }
                if let Some(n) = map.nodes.iter().find(|n| n.addr == node.addr) {
                    return Ok(reply(
                        format!(
                            "join: address {} is registered to node {}; remove that node first \
                             (natter-admin remove-node {}) or use another address",
                            node.addr, n.id, n.id
                        ),
                        Some(map),
                    ));
                }
                let id = map
                    .max_node_id
                    .max(map.nodes.iter().map(|n| n.id).max().unwrap_or(0))
                    + 1;
                map.max_node_id = id;
                map.nodes.push(NodeInfo {
                    id,
                    addr: node.addr,
                    region: node.region,
                    draining: false,
                });
                map.nodes.sort_by_key(|n: &NodeInfo| n.id);
                kv.put(MAP_KEY, &map.encode_to_vec());
                return Ok(MetaResponse {
                    error: String::new(),
                    map: Some(map),
                    node_id: id,
                }
                .encode_to_vec());
            }
            (Op::Drain(d), Some(mut map)) => {
                let Some(region) = map
                    .nodes
                    .iter()
                    .find(|n| n.id == d.id)
                    .map(|n| n.region.clone())
                else {
                    return Ok(reply(format!("no node {}", d.id), Some(map)));
                };
                if d.draining && region_capacity(&map, &region, d.id) < region_needs(&map, &region)
                {
                    return Ok(reply(
                        format!(
                            "draining node {} would leave region {region:?} fewer nodes than its shards' {} replicas",
                            d.id,
                            region_needs(&map, &region)
                        ),
                        Some(map),
                    ));
                }
                if let Some(n) = map.nodes.iter_mut().find(|n| n.id == d.id) {
                    n.draining = d.draining;
                }
                map
            }
            (Op::RemoveNode(id), Some(mut map)) => {
                let Some(region) = map
                    .nodes
                    .iter()
                    .find(|n| n.id == id)
                    .map(|n| n.region.clone())
                else {
                    return Ok(reply(format!("no node {id}"), Some(map)));
                };
                let held: Vec<u32> = map
                    .shards
                    .iter()
                    .filter(|s| s.replicas.contains(&id))
                    .map(|s| s.shard)
                    .collect();
                if !held.is_empty() {
                    return Ok(reply(
                        format!(
                            "node {id} still holds replicas of shards {held:?}: drain it first"
                        ),
                        Some(map),
                    ));
                }
                if region_capacity(&map, &region, id) < region_needs(&map, &region) {
                    return Ok(reply(
                        format!("removing node {id} would leave region {region:?} too few nodes"),
                        Some(map),
                    ));
                }
                map.nodes.retain(|n| n.id != id);
                map
            }
        };
        map.max_node_id = map
            .max_node_id
            .max(map.nodes.iter().map(|n| n.id).max().unwrap_or(0));
        kv.put(MAP_KEY, &map.encode_to_vec());
        Ok(reply("", Some(map)))
    }
}

impl StateMachine for Meta {
    fn apply(&self, kv: &mut dyn KvWrite, command: &[u8]) -> KvResult<Vec<u8>> {
        match MetaCommand::decode(command) {
            Ok(MetaCommand { op: Some(op) }) => Self::apply_op(kv, op),
            Ok(MetaCommand { op: None }) => Ok(reply("empty meta command", None)),
            Err(e) => Ok(reply(format!("undecodable meta command: {e}"), None)),
        }
    }

    fn query(&self, kv: &dyn KvRead, _query: &[u8]) -> KvResult<Vec<u8>> {
        Ok(reply("", load(kv)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use natter_proto::cluster::DrainNode;
    use std::collections::BTreeMap;
    use std::ops::Bound;

    /// In-memory rows for this module's tests only.
    #[derive(Default)]
    struct Mem(BTreeMap<Vec<u8>, Vec<u8>>);
    impl KvRead for Mem {
        fn get(&self, key: &[u8]) -> KvResult<Option<Vec<u8>>> {
            Ok(self.0.get(key).cloned())
        }
        fn scan(
            &self,
            _: Bound<&[u8]>,
            _: Bound<&[u8]>,
            _: bool,
            _: usize,
        ) -> KvResult<Vec<natter_kv::Pair>> {
            Ok(Vec::new())
        }
    }
    impl KvWrite for Mem {
        fn put(&mut self, key: &[u8], value: &[u8]) {
            self.0.insert(key.to_vec(), value.to_vec());
        }
        fn delete(&mut self, key: &[u8]) {
            self.0.remove(key);
        }
    }

    fn run(kv: &mut Mem, op: Op) -> MetaResponse {
        let out = Meta
            .apply(kv, &MetaCommand { op: Some(op) }.encode_to_vec())
            .unwrap();
        MetaResponse::decode(out.as_slice()).unwrap()
    }

    fn node(id: u64) -> NodeInfo {
        NodeInfo {
            id,
            addr: format!("127.0.0.1:{}", 7000 + id),
            region: "local".into(),
            draining: false,
        }
    }

    #[test]
    fn placement_spreads_replicas_evenly() {
        let p = initial_placement(&[1, 2, 3, 4], 8, 3);
        let mut count = BTreeMap::new();
        for s in &p {
            assert_eq!(s.replicas.len(), 3);
            for r in &s.replicas {
                *count.entry(*r).or_insert(0) += 1;
            }
        }
        assert_eq!(
            count.values().copied().collect::<Vec<_>>(),
            vec![6, 6, 6, 6]
        );
        assert_eq!(initial_placement(&[1], 2, 3)[0].replicas, vec![1]);
        // First leaders: a replica of their shard, two shards per node.
        let mut leads = BTreeMap::new();
        for s in &p {
            let first = first_choice(&[1, 2, 3, 4], s.shard).unwrap();
            assert!(s.replicas.contains(&first), "{first} not in {s:?}");
            *leads.entry(first).or_insert(0) += 1;
        }
        assert_eq!(leads.values().copied().collect::<Vec<_>>(), vec![2; 4]);
        assert_eq!(first_choice(&[], 1), None);
        assert_eq!(first_choice(&[1], 0), None);
    }

    #[test]
    fn init_once_then_registry_never_reuses_ids() {
        let mut kv = Mem::default();
        assert_eq!(
            run(&mut kv, Op::RegisterNode(node(1))).error,
            "cluster not initialized"
        );
        let init = ShardMap {
            shard_count: 2,
            nodes: vec![node(1), node(2)],
            shards: initial_placement(&[1, 2], 2, 3),
            max_node_id: 2,
        };
        assert_eq!(run(&mut kv, Op::Init(init.clone())).error, "");
        let again = run(
            &mut kv,
            Op::Init(ShardMap {
                shard_count: 3,
                ..init
            }),
        );
        assert!(again.error.contains("already initialized"));
        assert_eq!(
            run(&mut kv, Op::RegisterNode(node(3)))
                .map
                .unwrap()
                .max_node_id,
            3
        );
        // Node 3 removed from the list (as a drain would), then re-registered: refused.
        let mut map = load(&kv).unwrap().unwrap();
        map.nodes.retain(|n| n.id != 3);
        kv.put(MAP_KEY, &map.encode_to_vec());
        assert!(run(&mut kv, Op::RegisterNode(node(3)))
            .error
            .contains("never reused"));
        assert!(run(
            &mut kv,
            Op::SetPlacement(ShardPlacement {
                shard: 1,
                replicas: vec![9],
                region: String::new(),
            })
        )
        .error
        .contains("unknown node"));
        let garbage = Meta.apply(&mut kv, b"\xff\xff garbage").unwrap();
        let garbage = MetaResponse::decode(garbage.as_slice()).unwrap();
        assert!(garbage.error.contains("undecodable"), "{garbage:?}");
    }

    #[test]
    fn join_assigns_fresh_ids_and_drain_and_remove_keep_regions_whole() {
        let mut kv = Mem::default();
        let mut init = ShardMap {
            shard_count: 2,
            nodes: vec![node(1), node(2), node(3)],
            shards: initial_placement(&[1, 2, 3], 2, 3),
            max_node_id: 3,
        };
        for p in &mut init.shards {
            p.region = "local".into();
        }
        assert_eq!(run(&mut kv, Op::Init(init)).error, "");
        let join = |addr: &str| NodeInfo {
            id: 0,
            addr: addr.into(),
            region: "local".into(),
            draining: false,
        };
        let r = run(&mut kv, Op::Join(join("10.0.0.4:1")));
        assert_eq!((r.error.as_str(), r.node_id), ("", 4));
        // The same address twice is refused (a lost reply must not mint a
        // second id silently).
        assert!(run(&mut kv, Op::Join(join("10.0.0.4:1")))
            .error
            .contains("registered to node 4"));
        // Draining one of four is fine; a second would leave 2 < 3 replicas.
        assert_eq!(
            run(
                &mut kv,
                Op::Drain(DrainNode {
                    id: 1,
                    draining: true
                })
            )
            .error,
            ""
        );
        assert!(run(
            &mut kv,
            Op::Drain(DrainNode {
                id: 2,
                draining: true
            })
        )
        .error
        .contains("fewer nodes"));
        // Node 1 still holds replicas: removal refused until placement moves.
        assert!(run(&mut kv, Op::RemoveNode(1))
            .error
            .contains("still holds replicas"));
        for shard in 1..=2 {
            assert_eq!(
                run(
                    &mut kv,
                    Op::SetPlacement(ShardPlacement {
                        shard,
                        replicas: vec![2, 3, 4],
                        region: String::new(),
                    })
                )
                .error,
                ""
            );
        }
        // Two replicas on one node are refused.
        assert!(run(
            &mut kv,
            Op::SetPlacement(ShardPlacement {
                shard: 1,
                replicas: vec![2, 2, 3],
                region: String::new(),
            })
        )
        .error
        .contains("never two"));
        let r = run(&mut kv, Op::RemoveNode(1));
        assert_eq!(r.error, "");
        let map = r.map.unwrap();
        assert!(map.nodes.iter().all(|n| n.id != 1));
        // Ids keep growing after a removal.
        assert_eq!(run(&mut kv, Op::Join(join("10.0.0.5:1"))).node_id, 5);
        // Removing another would break the region's replica count.
        assert!(run(
            &mut kv,
            Op::Drain(DrainNode {
                id: 5,
                draining: true
            })
        )
        .error
        .is_empty());
        for shard in 1..=2 {
            run(
                &mut kv,
                Op::SetPlacement(ShardPlacement {
                    shard,
                    replicas: vec![2, 3, 4],
                    region: String::new(),
                }),
            );
        }
        assert!(run(&mut kv, Op::RemoveNode(2))
            .error
            .contains("still holds"));
    }
}
