//! The embedded store: one redb file, durable across restarts, the default on one machine.
//!
//! Tables: `kv` (key → header + value), `log` (revision → the events of that revision, for
//! watches from a past revision) and `meta` (current and compacted revision). Writes go through
//! redb's single writer; committed revisions are announced on a `watch` channel, and each watcher
//! reads the log forward from where it is, so a slow watcher never loses events.

use std::path::Path;
use std::sync::Arc;

use futures::FutureExt as _;
use futures::future::BoxFuture;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{mpsc, watch};

use super::{
    Event, EventKind, KeyValue, Op, RangeResult, Revision, Store, StoreError, Txn, TxnResult,
    WatchBatch, WatchStream, prefix_end,
};

const KV: TableDefinition<&[u8], &[u8]> = TableDefinition::new("kv");
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const REVISION: &str = "revision";
const COMPACTED: &str = "compacted";
/// History kept for watches; older log entries are dropped as new revisions come in.
const RETAIN_REVISIONS: i64 = 100_000;

#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
    head: watch::Sender<Revision>,
}

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl EmbeddedStore {
    /// Opens (or creates) the store file at `path`.
    /// Opens (or creates) the store file, readable by its owner only: it holds e-mail
    /// addresses, hostnames and the audit log.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        crate::files::ensure_private_file(path).map_err(err)?;
        let db = Database::create(path).map_err(err)?;
        let w = db.begin_write().map_err(err)?;
        let rev = {
            w.open_table(KV).map_err(err)?;
            w.open_table(LOG).map_err(err)?;
            let meta = w.open_table(META).map_err(err)?;
            meta.get(REVISION)
                .map_err(err)?
                .map(|g| g.value())
                .unwrap_or(0)
        };
        w.commit().map_err(err)?;
        let (head, _) = watch::channel(rev as Revision);
        Ok(Self {
            inner: Arc::new(Inner { db, head }),
        })
    }

    fn read_kv(&self, key: &[u8]) -> Result<Option<KeyValue>, StoreError> {
        let r = self.inner.db.begin_read().map_err(err)?;
        let t = r.open_table(KV).map_err(err)?;
        match t.get(key).map_err(err)? {
            Some(v) => Ok(Some(decode_kv(key, v.value())?)),
            None => Ok(None),
        }
    }

    fn read_range(&self, prefix: &[u8]) -> Result<RangeResult, StoreError> {
        self.read_ranges(std::slice::from_ref(&prefix.to_vec()))
    }

    /// Every prefix in one read transaction: one snapshot, one revision.
    fn read_ranges(&self, prefixes: &[Vec<u8>]) -> Result<RangeResult, StoreError> {
        let r = self.inner.db.begin_read().map_err(err)?;
        let meta = r.open_table(META).map_err(err)?;
        let revision = meta
            .get(REVISION)
            .map_err(err)?
            .map(|g| g.value())
            .unwrap_or(0) as i64;
        let t = r.open_table(KV).map_err(err)?;
        let mut kvs = Vec::new();
        for prefix in prefixes {
            let prefix = prefix.as_slice();
            let iter = match prefix_end(prefix) {
                Some(end) => t.range::<&[u8]>(prefix..end.as_slice()).map_err(err)?,
                None => t.range::<&[u8]>(prefix..).map_err(err)?,
            };
            for item in iter {
                let (k, v) = item.map_err(err)?;
                kvs.push(decode_kv(k.value(), v.value())?);
            }
        }
        Ok(RangeResult { kvs, revision })
    }

    fn apply(&self, txn: Txn) -> Result<TxnResult, StoreError> {
        let w = self.inner.db.begin_write().map_err(err)?;
        let (result, events) = {
            let mut kv = w.open_table(KV).map_err(err)?;
            let mut meta = w.open_table(META).map_err(err)?;
            let current = meta
                .get(REVISION)
                .map_err(err)?
                .map(|g| g.value())
                .unwrap_or(0) as i64;
            for c in &txn.compares {
                let m = match kv.get(c.key.as_slice()).map_err(err)? {
                    Some(v) => decode_header(v.value())?.1,
                    None => 0,
                };
                if m != c.mod_revision {
                    return Ok(TxnResult {
                        succeeded: false,
                        revision: current,
                    });
                }
            }
            let rev = current + 1;
            let mut events = Vec::new();
            for op in &txn.ops {
                apply_op(&mut kv, op, rev, &mut events)?;
            }
            if events.is_empty() {
                return Ok(TxnResult {
                    succeeded: true,
                    revision: current,
                });
            }
            meta.insert(REVISION, rev as u64).map_err(err)?;
            let mut log = w.open_table(LOG).map_err(err)?;
            log.insert(rev as u64, encode_events(&events).as_slice())
                .map_err(err)?;
            // Keep the log bounded: drop what has fallen out of the retained window.
            let floor = rev - RETAIN_REVISIONS;
            if floor > 0 && rev % 1024 == 0 {
                compact_log(&mut log, &mut meta, floor)?;
            }
            (
                TxnResult {
                    succeeded: true,
                    revision: rev,
                },
                events,
            )
        };
        w.commit().map_err(err)?;
        drop(events);
        self.inner.head.send_replace(result.revision);
        Ok(result)
    }

    fn compact_to(&self, revision: Revision) -> Result<(), StoreError> {
        let w = self.inner.db.begin_write().map_err(err)?;
        {
            let mut log = w.open_table(LOG).map_err(err)?;
            let mut meta = w.open_table(META).map_err(err)?;
            compact_log(&mut log, &mut meta, revision - 1)?;
        }
        w.commit().map_err(err)
    }
}

impl Inner {
    /// Reads the log for revisions `from..=to` (filtered by `prefix`), or `Compacted`.
    fn read_log(
        &self,
        prefix: &[u8],
        from: Revision,
        to: Revision,
    ) -> Result<Vec<WatchBatch>, StoreError> {
        let r = self.db.begin_read().map_err(err)?;
        let meta = r.open_table(META).map_err(err)?;
        let compacted = meta
            .get(COMPACTED)
            .map_err(err)?
            .map(|g| g.value())
            .unwrap_or(0) as i64;
        if from <= compacted {
            return Err(StoreError::Compacted {
                requested: from,
                compacted,
            });
        }
        let log = r.open_table(LOG).map_err(err)?;
        let mut out = Vec::new();
        for item in log.range(from as u64..=to as u64).map_err(err)? {
            let (rev, data) = item.map_err(err)?;
            let events: Vec<Event> = decode_events(data.value())?
                .into_iter()
                .filter(|e| e.kv.key.starts_with(prefix))
                .collect();
            if !events.is_empty() {
                out.push(WatchBatch {
                    revision: rev.value() as i64,
                    events,
                });
            }
        }
        Ok(out)
    }
}

fn compact_log(
    log: &mut redb::Table<u64, &[u8]>,
    meta: &mut redb::Table<&str, u64>,
    upto: Revision,
) -> Result<(), StoreError> {
    let compacted = meta
        .get(COMPACTED)
        .map_err(err)?
        .map(|g| g.value())
        .unwrap_or(0) as i64;
    if upto <= compacted {
        return Ok(());
    }
    log.retain_in(0..=upto as u64, |_, _| false).map_err(err)?;
    meta.insert(COMPACTED, upto as u64).map_err(err)?;
    Ok(())
}

fn deleted(key: Vec<u8>, rev: Revision) -> Event {
    Event {
        kind: EventKind::Delete,
        kv: KeyValue {
            key,
            value: Vec::new(),
            create_revision: 0,
            mod_revision: rev,
            version: 0,
        },
    }
}

// Encoding: kv value = create(8) mod(8) version(8) value; log = events, each
// kind(1) create(8) mod(8) version(8) keylen(4) key vallen(4) value. Little-endian.

fn encode_kv(kv: &KeyValue) -> Vec<u8> {
    let mut out = Vec::with_capacity(24 + kv.value.len());
    out.extend_from_slice(&kv.create_revision.to_le_bytes());
    out.extend_from_slice(&kv.mod_revision.to_le_bytes());
    out.extend_from_slice(&kv.version.to_le_bytes());
    out.extend_from_slice(&kv.value);
    out
}

fn decode_header(data: &[u8]) -> Result<(i64, i64, i64), StoreError> {
    let mut r = Reader(data);
    Ok((r.i64()?, r.i64()?, r.i64()?))
}

fn decode_kv(key: &[u8], data: &[u8]) -> Result<KeyValue, StoreError> {
    let (create_revision, mod_revision, version) = decode_header(data)?;
    Ok(KeyValue {
        key: key.to_vec(),
        value: data[24..].to_vec(),
        create_revision,
        mod_revision,
        version,
    })
}

fn encode_events(events: &[Event]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in events {
        out.push(match e.kind {
            EventKind::Put => 1,
            EventKind::Delete => 2,
        });
        out.extend_from_slice(&e.kv.create_revision.to_le_bytes());
        out.extend_from_slice(&e.kv.mod_revision.to_le_bytes());
        out.extend_from_slice(&e.kv.version.to_le_bytes());
        out.extend_from_slice(&(e.kv.key.len() as u32).to_le_bytes());
        out.extend_from_slice(&e.kv.key);
        out.extend_from_slice(&(e.kv.value.len() as u32).to_le_bytes());
        out.extend_from_slice(&e.kv.value);
    }
    out
}

fn decode_events(data: &[u8]) -> Result<Vec<Event>, StoreError> {
    let mut r = Reader(data);
    let mut out = Vec::new();
    while !r.0.is_empty() {
        let kind = match r.take(1)?[0] {
            1 => EventKind::Put,
            2 => EventKind::Delete,
            k => return Err(StoreError::Corrupt(format!("unknown event kind {k}"))),
        };
        let (create_revision, mod_revision, version) = (r.i64()?, r.i64()?, r.i64()?);
        let klen = r.u32()? as usize;
        let key = r.take(klen)?.to_vec();
        let vlen = r.u32()? as usize;
        let value = r.take(vlen)?.to_vec();
        out.push(Event {
            kind,
            kv: KeyValue {
                key,
                value,
                create_revision,
                mod_revision,
                version,
            },
        });
    }
    Ok(out)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], StoreError> {
        if self.0.len() < n {
            return Err(StoreError::Corrupt("record is truncated".into()));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn i64(&mut self) -> Result<i64, StoreError> {
        let b = self.take(8)?;
        Ok(i64::from_le_bytes(
            b.try_into()
                .map_err(|_| StoreError::Corrupt("i64".into()))?,
        ))
    }
    fn u32(&mut self) -> Result<u32, StoreError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes(
            b.try_into()
                .map_err(|_| StoreError::Corrupt("u32".into()))?,
        ))
    }
}

/// One write of a transaction at revision `rev`, with the watch events it makes.
fn apply_op(
    kv: &mut redb::Table<&[u8], &[u8]>,
    op: &Op,
    rev: Revision,
    events: &mut Vec<Event>,
) -> Result<(), StoreError> {
    match op {
        Op::Put { key, value } => {
            let (create, version) = match kv.get(key.as_slice()).map_err(err)? {
                Some(v) => {
                    let (c, _, ver) = decode_header(v.value())?;
                    (c, ver + 1)
                }
                None => (rev, 1),
            };
            let kvv = KeyValue {
                key: key.clone(),
                value: value.clone(),
                create_revision: create,
                mod_revision: rev,
                version,
            };
            kv.insert(key.as_slice(), encode_kv(&kvv).as_slice())
                .map_err(err)?;
            events.push(Event {
                kind: EventKind::Put,
                kv: kvv,
            });
        }
        Op::Delete { key } => {
            if kv.remove(key.as_slice()).map_err(err)?.is_some() {
                events.push(deleted(key.clone(), rev));
            }
        }
        Op::DeletePrefix { prefix } => {
            delete_range(kv, prefix, prefix_end(prefix).as_deref(), rev, events)?
        }
        Op::DeleteRange { start, end } => delete_range(kv, start, Some(end), rev, events)?,
    }
    Ok(())
}

/// Removes every key from `start` up to `end` (excluded; `None`: to the last key).
fn delete_range(
    kv: &mut redb::Table<&[u8], &[u8]>,
    start: &[u8],
    end: Option<&[u8]>,
    rev: Revision,
    events: &mut Vec<Event>,
) -> Result<(), StoreError> {
    if end.is_some_and(|e| e <= start) {
        return Ok(());
    }
    let mut keys = Vec::new();
    let iter = match end {
        Some(end) => kv.range::<&[u8]>(start..end),
        None => kv.range::<&[u8]>(start..),
    }
    .map_err(err)?;
    for item in iter {
        keys.push(item.map_err(err)?.0.value().to_vec());
    }
    for key in keys {
        kv.remove(key.as_slice()).map_err(err)?;
        events.push(deleted(key, rev));
    }
    Ok(())
}

impl Store for EmbeddedStore {
    fn get<'a>(&'a self, key: &'a [u8]) -> BoxFuture<'a, Result<Option<KeyValue>, StoreError>> {
        async move { self.read_kv(key) }.boxed()
    }

    fn range<'a>(&'a self, prefix: &'a [u8]) -> BoxFuture<'a, Result<RangeResult, StoreError>> {
        async move { self.read_range(prefix) }.boxed()
    }

    fn range_many<'a>(
        &'a self,
        prefixes: &'a [Vec<u8>],
    ) -> BoxFuture<'a, Result<RangeResult, StoreError>> {
        async move { self.read_ranges(prefixes) }.boxed()
    }

    fn first_key<'a>(
        &'a self,
        prefix: &'a [u8],
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, StoreError>> {
        async move {
            let r = self.inner.db.begin_read().map_err(err)?;
            let t = r.open_table(KV).map_err(err)?;
            let mut iter = match prefix_end(prefix) {
                Some(end) => t.range::<&[u8]>(prefix..end.as_slice()).map_err(err)?,
                None => t.range::<&[u8]>(prefix..).map_err(err)?,
            };
            Ok(match iter.next() {
                Some(item) => Some(item.map_err(err)?.0.value().to_vec()),
                None => None,
            })
        }
        .boxed()
    }

    fn txn(&self, txn: Txn) -> BoxFuture<'_, Result<TxnResult, StoreError>> {
        let this = self.clone();
        async move {
            // A commit waits for fsync: keep it off the async workers.
            tokio::task::spawn_blocking(move || this.apply(txn))
                .await
                .map_err(|e| StoreError::Unavailable(format!("store writer failed: {e}")))?
        }
        .boxed()
    }

    fn watch<'a>(
        &'a self,
        prefix: &'a [u8],
        start_revision: Revision,
    ) -> BoxFuture<'a, Result<WatchStream, StoreError>> {
        let this = self.clone();
        let prefix = prefix.to_vec();
        async move {
            let mut head = this.inner.head.subscribe();
            let current = *head.borrow_and_update();
            let mut next = if start_revision <= 0 {
                current + 1
            } else {
                start_revision
            };
            // Fail early (not on the stream) when the start is already compacted.
            if next <= current {
                this.inner.read_log(&prefix, next, next)?;
            }
            let (tx, rx) = mpsc::channel(64);
            // The watcher holds the store weakly: an open watch never keeps the file locked
            // after every owner of the store is gone.
            let weak = Arc::downgrade(&this.inner);
            drop(this);
            tokio::spawn(async move {
                loop {
                    let to = *head.borrow_and_update();
                    if next <= to {
                        let Some(inner) = weak.upgrade() else { return };
                        let read = inner.read_log(&prefix, next, to);
                        drop(inner);
                        match read {
                            Ok(batches) => {
                                for b in batches {
                                    if tx.send(Ok(b)).await.is_err() {
                                        return;
                                    }
                                }
                                next = to + 1;
                            }
                            Err(e) => {
                                let _ = tx.send(Err(e)).await;
                                return;
                            }
                        }
                    }
                    tokio::select! {
                        changed = head.changed() => if changed.is_err() { return },
                        _ = tx.closed() => return,
                    }
                }
            });
            Ok(rx)
        }
        .boxed()
    }

    fn quiesce(&self) -> BoxFuture<'_, ()> {
        async move {
            // Work started before (a blocking commit, a watcher's read) holds the inner handle.
            let t = std::time::Instant::now();
            while Arc::strong_count(&self.inner) > 1
                && t.elapsed() < std::time::Duration::from_secs(10)
            {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        }
        .boxed()
    }

    fn compact(&self, revision: Revision) -> BoxFuture<'_, Result<(), StoreError>> {
        let this = self.clone();
        async move {
            tokio::task::spawn_blocking(move || this.compact_to(revision))
                .await
                .map_err(|e| StoreError::Unavailable(e.to_string()))?
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    crate::store_conformance_tests!(async |dir: std::path::PathBuf| {
        let store = std::sync::Arc::new(EmbeddedStore::open(&dir.join("store.redb")).unwrap());
        (store, ())
    });

    #[tokio::test]
    async fn embedded_store_keeps_data_and_revision_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let rev = {
            let s = EmbeddedStore::open(&path).unwrap();
            s.txn(Txn::new().then(Op::put("/k", "v")))
                .await
                .unwrap()
                .revision
        };
        let s = EmbeddedStore::open(&path).unwrap();
        let kv = s.get(b"/k").await.unwrap().unwrap();
        assert_eq!(
            (kv.value.as_slice(), kv.mod_revision),
            (b"v".as_slice(), rev)
        );
        let next = s
            .txn(Txn::new().then(Op::put("/k", "w")))
            .await
            .unwrap()
            .revision;
        assert_eq!(next, rev + 1);
    }
}
