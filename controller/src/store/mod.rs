//! The controller's key-value store, shaped like etcd's data model so backends are interchangeable.
//!
//! - Every committed write bumps one global `revision`; each key carries the revision that
//!   created it, last modified it, and how many times it was written.
//! - Writes are transactions: all [`Compare`]s hold, then all [`Op`]s apply atomically, or none do.
//! - [`Store::watch`] streams every change under a prefix from a given revision on, in revision
//!   order; a revision older than the retained history answers [`StoreError::Compacted`], after
//!   which the caller re-lists and watches from the listed revision + 1.
//!
//! Backends: [`embedded::EmbeddedStore`] (redb, the single-machine default) and
//! [`etcd::EtcdStore`] (several replicas on one etcd cluster). The `conformance`
//! suite states the contract every backend must pass.

#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
pub mod embedded;
pub mod etcd;

use futures::FutureExt as _;
use futures::future::BoxFuture;
use tokio::sync::mpsc;

pub use crate::model::Revision;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub create_revision: Revision,
    pub mod_revision: Revision,
    pub version: i64,
}

/// A transaction guard: the key's mod revision must equal `mod_revision` (0: the key is absent).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Compare {
    pub key: Vec<u8>,
    pub mod_revision: Revision,
}

impl Compare {
    /// Holds while `key` does not exist (create-if-absent).
    pub fn absent(key: impl Into<Vec<u8>>) -> Self {
        Self {
            key: key.into(),
            mod_revision: 0,
        }
    }
    /// Holds while `key` is still at the revision it was read at.
    pub fn unchanged(key: impl Into<Vec<u8>>, mod_revision: Revision) -> Self {
        Self {
            key: key.into(),
            mod_revision,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Put {
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Delete {
        key: Vec<u8>,
    },
    DeletePrefix {
        prefix: Vec<u8>,
    },
    /// Every key in `start..end` (end excluded), as etcd's ranged delete.
    DeleteRange {
        start: Vec<u8>,
        end: Vec<u8>,
    },
}

impl Op {
    pub fn put(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Self {
        Op::Put {
            key: key.into(),
            value: value.into(),
        }
    }
    pub fn delete(key: impl Into<Vec<u8>>) -> Self {
        Op::Delete { key: key.into() }
    }
    pub fn delete_prefix(prefix: impl Into<Vec<u8>>) -> Self {
        Op::DeletePrefix {
            prefix: prefix.into(),
        }
    }
    pub fn delete_range(start: impl Into<Vec<u8>>, end: impl Into<Vec<u8>>) -> Self {
        Op::DeleteRange {
            start: start.into(),
            end: end.into(),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Txn {
    pub compares: Vec<Compare>,
    pub ops: Vec<Op>,
}

impl Txn {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn when(mut self, c: Compare) -> Self {
        self.compares.push(c);
        self
    }
    pub fn then(mut self, op: Op) -> Self {
        self.ops.push(op);
        self
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxnResult {
    /// Whether all compares held and the ops were applied.
    pub succeeded: bool,
    /// The store revision after the transaction (unchanged when it failed or wrote nothing).
    pub revision: Revision,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RangeResult {
    pub kvs: Vec<KeyValue>,
    /// The store revision the range was read at.
    pub revision: Revision,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

/// One change. For a delete, `kv.value` is empty and `kv.mod_revision` is the deletion revision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    pub kv: KeyValue,
}

/// All changes under the watched prefix made by one revision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchBatch {
    pub revision: Revision,
    pub events: Vec<Event>,
}

pub type WatchStream = mpsc::Receiver<Result<WatchBatch, StoreError>>;

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("revision {requested} has been compacted (history starts after {compacted})")]
    Compacted {
        requested: Revision,
        compacted: Revision,
    },
    #[error("store data is corrupt: {0}")]
    Corrupt(String),
}

/// The store contract. Object-safe so the backend is chosen at run time.
pub trait Store: Send + Sync + 'static {
    fn get<'a>(&'a self, key: &'a [u8]) -> BoxFuture<'a, Result<Option<KeyValue>, StoreError>>;
    /// All keys that start with `prefix`, in key order, at one revision.
    fn range<'a>(&'a self, prefix: &'a [u8]) -> BoxFuture<'a, Result<RangeResult, StoreError>>;
    /// All keys under each of `prefixes` (in that order, each in key order), all at one
    /// revision: a consistent picture of several parts of the store without reading the rest.
    /// The default reads them one by one and starts over until no write came in between;
    /// backends that can read at a fixed revision do it in one pass.
    fn range_many<'a>(
        &'a self,
        prefixes: &'a [Vec<u8>],
    ) -> BoxFuture<'a, Result<RangeResult, StoreError>> {
        async move {
            for _ in 0..100 {
                let mut all = RangeResult {
                    kvs: Vec::new(),
                    revision: 0,
                };
                let mut consistent = true;
                for p in prefixes {
                    let r = self.range(p).await?;
                    consistent &= all.revision == 0 || r.revision == all.revision;
                    all.revision = r.revision;
                    all.kvs.extend(r.kvs);
                }
                if consistent {
                    return Ok(all);
                }
            }
            Err(StoreError::Unavailable(
                "the store kept changing while it was read".into(),
            ))
        }
        .boxed()
    }
    /// The first key under `prefix`, if any, without reading the rest.
    fn first_key<'a>(
        &'a self,
        prefix: &'a [u8],
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, StoreError>> {
        async move {
            Ok(self
                .range(prefix)
                .await?
                .kvs
                .into_iter()
                .next()
                .map(|kv| kv.key))
        }
        .boxed()
    }
    fn txn(&self, txn: Txn) -> BoxFuture<'_, Result<TxnResult, StoreError>>;
    /// Streams changes under `prefix` from `start_revision` on (0: from the next revision).
    fn watch<'a>(
        &'a self,
        prefix: &'a [u8],
        start_revision: Revision,
    ) -> BoxFuture<'a, Result<WatchStream, StoreError>>;
    /// Discards history before `revision`; watches from earlier revisions get `Compacted`.
    fn compact(&self, revision: Revision) -> BoxFuture<'_, Result<(), StoreError>>;
    /// Waits until no operation is in flight on this store (before it is closed and reopened).
    fn quiesce(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

/// The exclusive end of a prefix range (etcd's `range_end`), or `None` for "to the end".
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_is_the_next_key_after_every_key_with_the_prefix() {
        assert_eq!(prefix_end(b"/a/"), Some(b"/a0".to_vec()));
        assert_eq!(prefix_end(&[1, 0xff]), Some(vec![2]));
        assert_eq!(prefix_end(&[0xff, 0xff]), None);
    }
}
