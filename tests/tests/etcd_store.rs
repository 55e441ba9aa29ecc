//! The etcd store passes the same conformance suite as the embedded store, against a real etcd.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use canopy_controller::store::etcd::EtcdStore;
use canopy_tests::etcd::Etcd;

canopy_controller::store_conformance_tests!(async |_dir: std::path::PathBuf| {
    let etcd = Etcd::start();
    let store = Arc::new(
        EtcdStore::connect(std::slice::from_ref(&etcd.endpoint))
            .await
            .unwrap(),
    );
    (store, etcd)
});
