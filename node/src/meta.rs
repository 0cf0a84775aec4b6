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
    }
    .encode_to_vec()
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
            ShardPlacement { shard, replicas: r }
        })
        .collect()
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
                match map.shards.iter_mut().find(|s| s.shard == p.shard) {
                    Some(s) => s.replicas = p.replicas,
                    None => return Ok(reply(format!("no shard {}", p.shard), Some(map))),
                }
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
                replicas: vec![9]
            })
        )
        .error
        .contains("unknown node"));
        let garbage = Meta.apply(&mut kv, b"\xff\xff garbage").unwrap();
        let garbage = MetaResponse::decode(garbage.as_slice()).unwrap();
        assert!(garbage.error.contains("undecodable"), "{garbage:?}");
    }
}
