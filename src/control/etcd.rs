//! The etcd v3 requests `[store]` makes, each bounded by `store.timeout`: the shared
//! document read, created and replaced by compare-and-swap on its `mod_revision`; the watch
//! on it; this replica's lease; the rollout's leader key; the meters replicas publish. It
//! knows keys and revisions, not routing.

use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse,
    WatchOptions, WatchStream,
};

use crate::config::StoreSettings;

/// etcd could not be reached or did not answer in time.
#[derive(Debug, Clone, thiserror::Error)]
#[error("etcd: {0}")]
pub struct StoreError(pub String);

impl From<etcd_client::Error> for StoreError {
    fn from(error: etcd_client::Error) -> Self {
        StoreError(error.to_string())
    }
}

/// A value as etcd holds it, with the revision that last changed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub revision: i64,
    pub bytes: Vec<u8>,
}

/// The outcome of a compare-and-swap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Swap {
    /// Written at this revision.
    Written(i64),
    /// Someone else's write came first; this is the value now (`None`: deleted).
    Lost(Option<Stored>),
}

/// A connected etcd client and the keys of one `[store]`.
#[derive(Clone)]
pub struct Etcd {
    client: Client,
    table: String,
    leader: String,
    meters: String,
    timeout: Duration,
}

impl Etcd {
    /// Connects to any of the endpoints.
    pub async fn connect(settings: &StoreSettings) -> Result<Etcd, StoreError> {
        let options = ConnectOptions::new()
            .with_connect_timeout(settings.timeout)
            .with_timeout(settings.timeout)
            .with_keep_alive(Duration::from_secs(2), settings.timeout)
            // Requests fail on a member cut off from the majority rather than answer stale.
            .with_require_leader(true);
        let client = bounded(
            settings.timeout,
            Client::connect(&settings.etcd, Some(options)),
        )
        .await?;
        let mut etcd = Etcd {
            client,
            table: settings.table_key(),
            leader: settings.leader_key(),
            meters: settings.meters_prefix(),
            timeout: settings.timeout,
        };
        // `connect` succeeds before any connection is made: ask something to know.
        etcd.read_table().await?;
        Ok(etcd)
    }

    /// The document and its revision, `None` when there is none yet.
    pub async fn read_table(&mut self) -> Result<Option<Stored>, StoreError> {
        let response = bounded(self.timeout, self.client.get(self.table.as_str(), None)).await?;
        Ok(response.kvs().first().map(|kv| Stored {
            revision: kv.mod_revision(),
            bytes: kv.value().to_vec(),
        }))
    }

    /// Writes the document if there is none (the first replica seeds it).
    pub async fn create_table(&mut self, bytes: Vec<u8>) -> Result<Swap, StoreError> {
        let when = Compare::create_revision(self.table.as_str(), CompareOp::Equal, 0);
        self.swap(vec![when], bytes).await
    }

    /// Replaces the document if it is still at `revision`; with `leader`, only while this
    /// replica (that value) holds the leader key.
    pub async fn replace_table(
        &mut self,
        revision: i64,
        bytes: Vec<u8>,
        leader: Option<&str>,
    ) -> Result<Swap, StoreError> {
        let mut when = vec![Compare::mod_revision(
            self.table.as_str(),
            CompareOp::Equal,
            revision,
        )];
        if let Some(me) = leader {
            when.push(Compare::value(self.leader.as_str(), CompareOp::Equal, me));
        }
        self.swap(when, bytes).await
    }

    async fn swap(&mut self, when: Vec<Compare>, bytes: Vec<u8>) -> Result<Swap, StoreError> {
        let txn = Txn::new()
            .when(when)
            .and_then(vec![TxnOp::put(self.table.as_str(), bytes, None)])
            .or_else(vec![TxnOp::get(self.table.as_str(), None)]);
        let response = bounded(self.timeout, self.client.txn(txn)).await?;
        if response.succeeded() {
            let revision = response.header().map_or(0, |h| h.revision());
            return Ok(Swap::Written(revision));
        }
        let current = response.op_responses().into_iter().find_map(|op| match op {
            TxnOpResponse::Get(get) => Some(get.kvs().first().map(|kv| Stored {
                revision: kv.mod_revision(),
                bytes: kv.value().to_vec(),
            })),
            _ => None,
        });
        Ok(Swap::Lost(current.flatten()))
    }

    /// Watches the document from `revision` on (inclusive).
    pub async fn watch_table(&mut self, revision: i64) -> Result<WatchStream, StoreError> {
        let options = WatchOptions::new().with_start_revision(revision);
        bounded(
            self.timeout,
            self.client.watch(self.table.as_str(), Some(options)),
        )
        .await
    }

    /// A lease of `ttl` seconds, kept alive by [`keep_alive`](Self::keep_alive).
    pub async fn grant_lease(&mut self, ttl: i64) -> Result<i64, StoreError> {
        let response = bounded(self.timeout, self.client.lease_grant(ttl, None)).await?;
        Ok(response.id())
    }

    /// Renews `lease` once; `false` when etcd says it has expired (gone, or a TTL of 0).
    pub async fn keep_alive(&mut self, lease: i64) -> Result<bool, StoreError> {
        // `lease_keep_alive` sends one renewal and reads its answer itself: "lease not found"
        // when the lease has expired.
        match bounded(self.timeout, self.client.lease_keep_alive(lease)).await {
            Ok(_) => Ok(true),
            Err(error) if error.0.contains("lease not found") => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// Lets the lease go, and the keys held with it (a replica stopping).
    pub async fn revoke(&mut self, lease: i64) -> Result<(), StoreError> {
        bounded(self.timeout, self.client.lease_revoke(lease)).await?;
        Ok(())
    }

    /// Takes the leader key for `me` with `lease` if nobody holds it; answers who holds it
    /// now.
    pub async fn campaign(&mut self, me: &str, lease: i64) -> Result<Option<String>, StoreError> {
        let leader = self.leader.as_str();
        let txn = Txn::new()
            .when(vec![Compare::create_revision(leader, CompareOp::Equal, 0)])
            .and_then(vec![TxnOp::put(
                leader,
                me,
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else(vec![TxnOp::get(leader, None)]);
        let response = bounded(self.timeout, self.client.txn(txn)).await?;
        if response.succeeded() {
            return Ok(Some(me.to_owned()));
        }
        Ok(response.op_responses().into_iter().find_map(|op| match op {
            TxnOpResponse::Get(get) => get
                .kvs()
                .first()
                .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
            _ => None,
        }))
    }

    /// Gives the leader key up if `me` holds it.
    pub async fn resign(&mut self, me: &str) -> Result<(), StoreError> {
        let leader = self.leader.as_str();
        let txn = Txn::new()
            .when(vec![Compare::value(leader, CompareOp::Equal, me)])
            .and_then(vec![TxnOp::delete(leader, None)]);
        bounded(self.timeout, self.client.txn(txn)).await?;
        Ok(())
    }

    /// Publishes this replica's meters under `PREFIX/meters/ME`, held with `lease`.
    pub async fn publish_meters(
        &mut self,
        me: &str,
        bytes: Vec<u8>,
        lease: i64,
    ) -> Result<(), StoreError> {
        let key = format!("{}{me}", self.meters);
        let options = PutOptions::new().with_lease(lease);
        bounded(self.timeout, self.client.put(key, bytes, Some(options))).await?;
        Ok(())
    }

    /// Every replica's published meters: (replica, bytes).
    pub async fn read_meters(&mut self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let options = GetOptions::new().with_prefix();
        let response = bounded(
            self.timeout,
            self.client.get(self.meters.as_str(), Some(options)),
        )
        .await?;
        Ok(response
            .kvs()
            .iter()
            .map(|kv| {
                let key = String::from_utf8_lossy(kv.key());
                let replica = key.strip_prefix(&self.meters).unwrap_or(&key).to_owned();
                (replica, kv.value().to_vec())
            })
            .collect())
    }
}

/// `request`, or a [`StoreError`] when it fails or takes longer than `timeout`.
async fn bounded<T>(
    timeout: Duration,
    request: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(timeout, request).await {
        Ok(result) => result.map_err(StoreError::from),
        Err(_) => Err(StoreError(format!(
            "no answer within {}",
            crate::duration::format_duration(timeout)
        ))),
    }
}
