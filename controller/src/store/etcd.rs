//! The etcd store (etcd-client): for several controller replicas on one etcd cluster. etcd's
//! model is what the [`Store`] trait is shaped after, so this is a thin mapping: revisions,
//! compare-on-mod-revision transactions, prefix ranges, and watches from a revision (a compacted
//! start revision answers [`StoreError::Compacted`]).

use std::time::Duration;

use etcd_client::{
    Client, Compare as ECompare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions,
    Txn as ETxn, TxnOp, WatchOptions,
};
use futures::FutureExt as _;
use futures::future::BoxFuture;
use tokio::sync::mpsc;

use super::{
    Event, EventKind, KeyValue, Op, RangeResult, Revision, Store, StoreError, Txn, TxnResult,
    WatchBatch, WatchStream,
};

#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    endpoints: Vec<String>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.endpoints)
            .finish()
    }
}

fn unavailable(e: etcd_client::Error) -> StoreError {
    StoreError::Unavailable(format!("etcd: {e}"))
}

fn kv(k: &etcd_client::KeyValue) -> KeyValue {
    KeyValue {
        key: k.key().to_vec(),
        value: k.value().to_vec(),
        create_revision: k.create_revision(),
        mod_revision: k.mod_revision(),
        version: k.version(),
    }
}

impl EtcdStore {
    /// Connects to etcd at `endpoints` (`127.0.0.1:2379` or `http://…`). Calls that cannot
    /// reach etcd fail after a few seconds with `Unavailable`.
    pub async fn connect(endpoints: &[String]) -> Result<Self, StoreError> {
        let urls: Vec<String> = endpoints
            .iter()
            .map(|e| {
                if e.contains("://") {
                    e.clone()
                } else {
                    format!("http://{e}")
                }
            })
            .collect();
        let opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_keep_alive_while_idle(true);
        let client = Client::connect(&urls, Some(opts))
            .await
            .map_err(unavailable)?;
        let store = Self {
            client,
            endpoints: urls,
        };
        // Fail at start, not on the first request, when etcd is not there.
        store
            .client
            .clone()
            .get("/canopy/v1/", Some(GetOptions::new().with_count_only()))
            .await
            .map_err(unavailable)?;
        Ok(store)
    }
}

/// Keys per page of a range: no response comes near etcd-client's 4 MB decoding limit, however
/// large a prefix grows (an audit log, a network of many peers).
const PAGE: i64 = 1000;

impl EtcdStore {
    /// A prefix read in pages, all at one revision (`at`, or the first page's when 0). A
    /// revision compacted meanwhile answers [`StoreError::Compacted`].
    async fn paged_range(&self, prefix: &[u8], at: Revision) -> Result<RangeResult, StoreError> {
        let end = super::prefix_end(prefix).unwrap_or_else(|| vec![0]);
        let mut from = prefix.to_vec();
        let mut out = RangeResult {
            kvs: Vec::new(),
            revision: at,
        };
        loop {
            let mut opts = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
            if out.revision != 0 {
                opts = opts.with_revision(out.revision);
            }
            let r = self
                .client
                .clone()
                .get(from.clone(), Some(opts))
                .await
                .map_err(|e| compacted_or_unavailable(e, out.revision))?;
            if out.revision == 0 {
                out.revision = r.header().map_or(0, |h| h.revision());
            }
            out.kvs.extend(r.kvs().iter().map(kv));
            match (r.more(), r.kvs().last()) {
                (true, Some(last)) => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => return Ok(out),
            }
        }
    }
}

/// etcd answers a read at a compacted revision with "required revision has been compacted".
fn compacted_or_unavailable(e: etcd_client::Error, at: Revision) -> StoreError {
    if e.to_string().contains("compacted") {
        StoreError::Compacted {
            requested: at,
            compacted: 0,
        }
    } else {
        unavailable(e)
    }
}

/// A watch response's events as batches, one per revision, in order: one response may carry
/// several revisions; one revision is never split.
fn batches(resp: &etcd_client::WatchResponse) -> Vec<WatchBatch> {
    let mut out: Vec<WatchBatch> = Vec::new();
    for e in resp.events() {
        let Some(k) = e.kv() else { continue };
        let event = Event {
            kind: match e.event_type() {
                EventType::Put => EventKind::Put,
                EventType::Delete => EventKind::Delete,
            },
            kv: kv(k),
        };
        let rev = k.mod_revision();
        match out.last_mut() {
            Some(b) if b.revision == rev => b.events.push(event),
            _ => out.push(WatchBatch {
                revision: rev,
                events: vec![event],
            }),
        }
    }
    out
}

impl Store for EtcdStore {
    fn get<'a>(&'a self, key: &'a [u8]) -> BoxFuture<'a, Result<Option<KeyValue>, StoreError>> {
        async move {
            let r = self
                .client
                .clone()
                .get(key, None)
                .await
                .map_err(unavailable)?;
            Ok(r.kvs().first().map(kv))
        }
        .boxed()
    }

    fn range<'a>(&'a self, prefix: &'a [u8]) -> BoxFuture<'a, Result<RangeResult, StoreError>> {
        async move { self.paged_range(prefix, 0).await }.boxed()
    }

    fn first_key<'a>(
        &'a self,
        prefix: &'a [u8],
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, StoreError>> {
        async move {
            let opts = GetOptions::new()
                .with_prefix()
                .with_limit(1)
                .with_keys_only();
            let r = self
                .client
                .clone()
                .get(prefix, Some(opts))
                .await
                .map_err(unavailable)?;
            Ok(r.kvs().first().map(|k| k.key().to_vec()))
        }
        .boxed()
    }

    fn range_many<'a>(
        &'a self,
        prefixes: &'a [Vec<u8>],
    ) -> BoxFuture<'a, Result<RangeResult, StoreError>> {
        async move {
            let mut all = RangeResult {
                kvs: Vec::new(),
                revision: 0,
            };
            for p in prefixes {
                // The first read fixes the revision; the others read at it.
                let r = self.paged_range(p, all.revision).await?;
                all.revision = r.revision;
                all.kvs.extend(r.kvs);
            }
            Ok(all)
        }
        .boxed()
    }

    fn txn(&self, txn: Txn) -> BoxFuture<'_, Result<TxnResult, StoreError>> {
        async move {
            let compares: Vec<ECompare> = txn
                .compares
                .iter()
                .map(|c| ECompare::mod_revision(c.key.clone(), CompareOp::Equal, c.mod_revision))
                .collect();
            let ops: Vec<TxnOp> = txn
                .ops
                .iter()
                .map(|op| match op {
                    Op::Put { key, value } => TxnOp::put(key.clone(), value.clone(), None),
                    Op::Delete { key } => TxnOp::delete(key.clone(), None),
                    Op::DeletePrefix { prefix } => {
                        TxnOp::delete(prefix.clone(), Some(DeleteOptions::new().with_prefix()))
                    }
                    Op::DeleteRange { start, end } => TxnOp::delete(
                        start.clone(),
                        Some(DeleteOptions::new().with_range(end.clone())),
                    ),
                })
                .collect();
            let r = self
                .client
                .clone()
                .txn(ETxn::new().when(compares).and_then(ops))
                .await
                .map_err(unavailable)?;
            Ok(TxnResult {
                succeeded: r.succeeded(),
                revision: r.header().map_or(0, |h| h.revision()),
            })
        }
        .boxed()
    }

    fn watch<'a>(
        &'a self,
        prefix: &'a [u8],
        start_revision: Revision,
    ) -> BoxFuture<'a, Result<WatchStream, StoreError>> {
        async move {
            let mut opts = WatchOptions::new().with_prefix();
            if start_revision > 0 {
                opts = opts.with_start_revision(start_revision);
            }
            let mut stream = self
                .client
                .clone()
                .watch(prefix, Some(opts))
                .await
                .map_err(unavailable)?;
            let (tx, rx) = mpsc::channel(64);
            tokio::spawn(async move {
                loop {
                    let resp = tokio::select! {
                        r = stream.message() => r,
                        _ = tx.closed() => return,
                    };
                    let resp = match resp {
                        Ok(Some(r)) => r,
                        Ok(None) => {
                            let _ = tx
                                .send(Err(StoreError::Unavailable("etcd watch ended".into())))
                                .await;
                            return;
                        }
                        Err(e) => {
                            let _ = tx.send(Err(unavailable(e))).await;
                            return;
                        }
                    };
                    if resp.compact_revision() > 0 || resp.canceled() {
                        let err = if resp.compact_revision() > 0 {
                            StoreError::Compacted {
                                requested: start_revision,
                                compacted: resp.compact_revision(),
                            }
                        } else {
                            StoreError::Unavailable(format!(
                                "etcd cancelled the watch: {}",
                                resp.cancel_reason()
                            ))
                        };
                        let _ = tx.send(Err(err)).await;
                        return;
                    }
                    for b in batches(&resp) {
                        if tx.send(Ok(b)).await.is_err() {
                            return;
                        }
                    }
                }
            });
            Ok(rx)
        }
        .boxed()
    }

    fn compact(&self, revision: Revision) -> BoxFuture<'_, Result<(), StoreError>> {
        async move {
            self.client
                .clone()
                .compact(revision, None)
                .await
                .map_err(unavailable)?;
            Ok(())
        }
        .boxed()
    }
}
