//! The durable registry: providers, hashed tokens, origins and resources in redb.
//!
//! Every change is committed (redb fsyncs on commit) before the call returns, so an
//! acknowledged change survives SIGKILL. Reads are served from an in-memory copy that is
//! updated only after the commit.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;
use std::path::Path;

use parking_lot::{Mutex, RwLock};
use rand::RngCore;
use redb::{Database, ReadableTable, TableDefinition, TableHandle};
use serde::de::DeserializeOwned;
use serde::Serialize;
use sha2::{Digest, Sha256};

use edge_node::proxy::primary_key;

use super::model::{Origin, OriginOptions, PathMatch, Provider, Resource};

const PROVIDERS: TableDefinition<&str, &[u8]> = TableDefinition::new("providers");
const TOKENS: TableDefinition<&str, &str> = TableDefinition::new("tokens");
const ORIGINS: TableDefinition<&str, &[u8]> = TableDefinition::new("origins");
const RESOURCES: TableDefinition<&str, &[u8]> = TableDefinition::new("resources");
/// Hosts providers asked for that wait for the operator's approval (`[admin]
/// approve_new_hosts`): kept apart from `origins`, so nothing routes, pushes or plans them.
const HOST_CLAIMS: TableDefinition<&str, &[u8]> = TableDefinition::new("host_claims");

/// Why a registry call failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The object belongs to another provider.
    #[error("{0} belongs to another provider")]
    Forbidden(String),
    /// No such object.
    #[error("{0} not found")]
    NotFound(String),
    /// The request conflicts with existing state.
    #[error("{0}")]
    Conflict(String),
    /// The embedded database failed.
    #[error("registry store: {0}")]
    Store(String),
}

/// Whether a `put_origin` caller found the host new or already its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Not registered: the caller checked the name and purged old copies.
    New,
    /// Registered to this provider: an update.
    Owned,
}

fn store_err(e: impl Into<redb::Error>) -> RegistryError {
    RegistryError::Store(e.into().to_string())
}

fn json_err(e: serde_json::Error) -> RegistryError {
    RegistryError::Store(format!("cannot encode a record: {e}"))
}

#[derive(Debug, Default)]
struct Memory {
    providers: BTreeMap<String, Provider>,
    tokens: BTreeMap<String, String>,
    origins: BTreeMap<String, Origin>,
    /// Claims on hosts awaiting approval ([`HOST_CLAIMS`]).
    claims: BTreeMap<String, Origin>,
    resources: BTreeMap<String, Resource>,
    /// Resources by host and path: the planner resolves a resource for every candidate
    /// series each tick, under the series lock, so a lookup must not scan a host's resources.
    by_host: HashMap<String, HostIndex>,
}

/// One host's resource ids by path; several ids under one path resolve to the smallest.
#[derive(Debug, Default)]
struct HostIndex {
    exact: PathIds,
    prefix: PathIds,
}

type PathIds = BTreeMap<String, BTreeSet<String>>;

impl HostIndex {
    fn paths(&mut self, m: PathMatch) -> &mut PathIds {
        match m {
            PathMatch::Exact => &mut self.exact,
            PathMatch::Prefix => &mut self.prefix,
        }
    }

    fn add(&mut self, r: &Resource) {
        self.paths(r.r#match)
            .entry(r.path.clone())
            .or_default()
            .insert(r.id.clone());
    }

    /// Remove `r`; whether the host has no resource left.
    fn remove(&mut self, r: &Resource) -> bool {
        let paths = self.paths(r.r#match);
        if let Some(ids) = paths.get_mut(&r.path) {
            ids.remove(&r.id);
            if ids.is_empty() {
                paths.remove(&r.path);
            }
        }
        self.exact.is_empty() && self.prefix.is_empty()
    }

    /// The exact match of `path`, else its longest registered prefix.
    fn resolve(&self, path: &str) -> Option<&String> {
        if let Some(ids) = self.exact.get(path) {
            return ids.first();
        }
        // The greatest key ≤ the query is the longest prefix of `path` if it is one at all;
        // if not, no prefix of `path` lies between the two strings' common prefix and it, so
        // the search continues from that common prefix (strictly shorter each round).
        let mut query = path;
        loop {
            let (key, ids) = self
                .prefix
                .range::<str, _>((Bound::Unbounded, Bound::Included(query)))
                .next_back()?;
            if path.starts_with(key.as_str()) {
                return ids.first();
            }
            let mut common = key
                .bytes()
                .zip(query.bytes())
                .take_while(|(a, b)| a == b)
                .count();
            while !path.is_char_boundary(common) {
                common -= 1;
            }
            query = &path[..common];
        }
    }
}

impl Memory {
    fn insert_resource(&mut self, r: Resource) {
        if let Some(old) = self.resources.remove(&r.id) {
            self.unindex(&old);
        }
        self.by_host.entry(r.host.clone()).or_default().add(&r);
        self.resources.insert(r.id.clone(), r);
    }

    fn remove_resource(&mut self, id: &str) {
        if let Some(r) = self.resources.remove(id) {
            self.unindex(&r);
        }
    }

    fn unindex(&mut self, r: &Resource) {
        if self
            .by_host
            .get_mut(&r.host)
            .is_some_and(|idx| idx.remove(r))
        {
            self.by_host.remove(&r.host);
        }
    }
}

/// Providers, origins and resources.
pub struct Registry {
    /// `None` once closed for shutdown: the process ends with `exit`, which drops nothing,
    /// and a database never dropped is repaired (every page checked) at the next start.
    db: RwLock<Option<Database>>,
    mem: RwLock<Memory>,
    /// Held by every change from its ownership checks to its memory update, so two changes
    /// never interleave (two providers claiming one host at once: one wins on disk and in
    /// memory alike).
    writer: Mutex<()>,
    /// Most resources one provider may hold.
    max_resources_per_provider: usize,
    /// Most hosts one provider may hold.
    max_origins_per_provider: usize,
    /// The file did not exist: this start created an empty registry.
    created: bool,
    /// Where the store lives, to open it again after an I/O failure.
    path: std::path::PathBuf,
    /// Closed for shutdown (`db` is then `None` for good; otherwise `None` means the store
    /// failed and is opened again by the next change).
    closed: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

/// SHA-256 of a bearer token, hex. Only this is stored.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A fresh provider token (192 random bits) and its hash.
fn new_token() -> (String, String) {
    let token = format!("scdn_{}", random_hex(24));
    let hashed = hash_token(&token);
    (token, hashed)
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::thread_rng().fill_bytes(&mut b);
    hex::encode(b)
}

/// The row of `host`, served by `provider` from `upstream`.
fn origin_row(
    provider: &str,
    host: &str,
    upstream: &str,
    options: OriginOptions,
    registered_at_ms: u64,
) -> Origin {
    Origin {
        host: host.to_string(),
        upstream: upstream.to_string(),
        provider: provider.to_string(),
        forward_host: options.forward_host,
        strip_set_cookie: options.strip_set_cookie,
        cache_key_ignore_query: options.cache_key_ignore_query,
        registered_at_ms,
    }
}

fn load_table<T: DeserializeOwned>(
    txn: &redb::ReadTransaction,
    def: TableDefinition<&str, &[u8]>,
) -> Result<BTreeMap<String, T>, RegistryError> {
    let table = txn.open_table(def).map_err(store_err)?;
    let mut out = BTreeMap::new();
    for row in table.iter().map_err(store_err)? {
        let (k, v) = row.map_err(store_err)?;
        let value = serde_json::from_slice(v.value()).map_err(|e| {
            RegistryError::Store(format!(
                "corrupt record {:?} in table {}: {e}",
                k.value(),
                def.name()
            ))
        })?;
        out.insert(k.value().to_string(), value);
    }
    Ok(out)
}

impl Registry {
    /// Whether this start created the registry (its file did not exist).
    pub fn created(&self) -> bool {
        self.created
    }

    /// Open (or create) the registry at `path` and load it into memory. A store that cannot
    /// be read is an error naming the file, never a fresh empty registry.
    pub fn open(path: &Path) -> Result<Self, RegistryError> {
        Self::load(path).map_err(|e| match e {
            RegistryError::Store(m) => RegistryError::Store(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    fn load(path: &Path) -> Result<Self, RegistryError> {
        let created = !path.exists();
        let db = Database::create(path).map_err(store_err)?;
        let w = db.begin_write().map_err(store_err)?;
        {
            w.open_table(PROVIDERS).map_err(store_err)?;
            w.open_table(TOKENS).map_err(store_err)?;
            w.open_table(ORIGINS).map_err(store_err)?;
            w.open_table(RESOURCES).map_err(store_err)?;
            w.open_table(HOST_CLAIMS).map_err(store_err)?;
        }
        w.commit().map_err(store_err)?;
        // redb syncs the file, not its directory: a new registry's name must survive a crash
        // too, or the next start would begin an empty one.
        if created {
            edge_node::durable::sync_dir_of(path).map_err(store_err)?;
        }
        let mem = Self::memory_of(&db)?;
        Ok(Registry {
            db: RwLock::new(Some(db)),
            mem: RwLock::new(mem),
            writer: Mutex::new(()),
            max_resources_per_provider: usize::MAX,
            max_origins_per_provider: usize::MAX,
            created,
            path: path.to_path_buf(),
            closed: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Everything the store holds, as the registry keeps it in memory.
    fn memory_of(db: &Database) -> Result<Memory, RegistryError> {
        let r = db.begin_read().map_err(store_err)?;
        let mut mem = Memory {
            providers: load_table(&r, PROVIDERS)?,
            origins: load_table(&r, ORIGINS)?,
            claims: load_table(&r, HOST_CLAIMS)?,
            ..Memory::default()
        };
        let resources: BTreeMap<String, Resource> = load_table(&r, RESOURCES)?;
        for res in resources.into_values() {
            mem.insert_resource(res);
        }
        let tokens = r.open_table(TOKENS).map_err(store_err)?;
        for row in tokens.iter().map_err(store_err)? {
            let (k, v) = row.map_err(store_err)?;
            mem.tokens
                .insert(k.value().to_string(), v.value().to_string());
        }
        Ok(mem)
    }

    /// Limit how many resources one provider may register (existing ones are kept).
    pub fn with_max_resources_per_provider(mut self, n: usize) -> Self {
        self.max_resources_per_provider = n;
        self
    }

    /// Limit how many hosts one provider may register (existing ones are kept).
    pub fn with_max_origins_per_provider(mut self, n: usize) -> Self {
        self.max_origins_per_provider = n;
        self
    }

    /// Apply one change to the store, under the lock [`Self::changing`] took (which opened a
    /// failed store again). After a failure of the store (a full disk) redb refuses every
    /// later change until the database is opened again: the failed change is reported, and
    /// the store is opened again ([`Self::store_failed`]), so a passing failure does not leave
    /// the provider API read-only until a restart. Memory is changed only after a commit; a
    /// commit reported failed may still have reached the disk, so reopening reloads memory
    /// from it.
    fn write<F>(&self, f: F) -> Result<(), RegistryError>
    where
        F: FnOnce(&redb::WriteTransaction) -> Result<(), RegistryError>,
    {
        let (applied, failed) = {
            let db = self.db.read();
            let Some(db) = db.as_ref() else {
                return Err(RegistryError::Store("closed for shutdown".into()));
            };
            let applied = db.begin_write().map_err(store_err).and_then(|w| {
                f(&w)?;
                w.commit().map_err(store_err)
            });
            // A store error (not a refusal by the change's own checks) may leave redb needing
            // recovery, which only reopening gives it.
            let failed = matches!(applied, Err(RegistryError::Store(_)));
            (applied, failed)
        };
        if failed {
            self.store_failed();
        }
        applied
    }

    /// Drop the store after a failed change and open it again at once, not at the next
    /// change: reads (a token just rotated away, a host's owner) must not go on answering
    /// from memory the disk may have moved past. When it does not open, the next change
    /// tries again.
    fn store_failed(&self) {
        tracing::error!(path = %self.path.display(),
            "the registry's store failed to write and is opened again");
        *self.db.write() = None;
        if let Err(e) = self.reopen_if_failed() {
            tracing::error!(error = %e, "the registry's store is not open again yet");
        }
    }

    /// Take the lock every change holds, with memory as the disk has it: a change's checks
    /// (who owns a host, which resources a deletion takes along) must see what an earlier
    /// commit reported failed may still have written.
    fn changing(&self) -> Result<parking_lot::MutexGuard<'_, ()>, RegistryError> {
        let writer = self.writer.lock();
        self.reopen_if_failed()?;
        Ok(writer)
    }

    /// Open the store again when it was dropped after a failure (not for shutdown), and take
    /// memory from it: what a failed commit left on disk is what the registry holds.
    fn reopen_if_failed(&self) -> Result<(), RegistryError> {
        use std::sync::atomic::Ordering;
        if self.closed.load(Ordering::Acquire) || self.db.read().is_some() {
            return Ok(());
        }
        let mut db = self.db.write();
        if db.is_none() {
            let opened = Database::create(&self.path).map_err(|e| {
                RegistryError::Store(format!(
                    "{}: the store failed and cannot be opened again: {e}",
                    self.path.display()
                ))
            })?;
            let mem = Self::memory_of(&opened).map_err(|e| {
                RegistryError::Store(format!(
                    "{}: the store failed and cannot be read again: {e}",
                    self.path.display()
                ))
            })?;
            *self.mem.write() = mem;
            tracing::info!(path = %self.path.display(), "the registry's store is open again");
            *db = Some(opened);
        }
        Ok(())
    }

    /// Close the store once no change is in progress, so the next start finds it closed
    /// cleanly; later changes fail. Blocking: the close flushes to disk.
    pub fn close(&self) {
        let _writer = self.writer.lock();
        self.closed
            .store(true, std::sync::atomic::Ordering::Release);
        drop(self.db.write().take());
    }

    fn put_json<T: Serialize>(
        w: &redb::WriteTransaction,
        def: TableDefinition<&str, &[u8]>,
        key: &str,
        value: &T,
    ) -> Result<(), RegistryError> {
        let bytes = serde_json::to_vec(value).map_err(json_err)?;
        w.open_table(def)
            .map_err(store_err)?
            .insert(key, bytes.as_slice())
            .map_err(store_err)?;
        Ok(())
    }

    fn remove_row(
        w: &redb::WriteTransaction,
        def: TableDefinition<&str, &[u8]>,
        key: &str,
    ) -> Result<(), RegistryError> {
        w.open_table(def)
            .map_err(store_err)?
            .remove(key)
            .map_err(store_err)?;
        Ok(())
    }

    /// Create a provider; returns it and its bearer token (shown once, stored hashed).
    pub fn create_provider(&self, name: &str) -> Result<(Provider, String), RegistryError> {
        let _writer = self.changing()?;
        let provider = Provider {
            id: self.unused_id("p", |m, id| m.providers.contains_key(id)),
            name: name.to_string(),
        };
        let (token, hashed) = new_token();
        self.write(|w| {
            Self::put_json(w, PROVIDERS, &provider.id, &provider)?;
            w.open_table(TOKENS)
                .map_err(store_err)?
                .insert(hashed.as_str(), provider.id.as_str())
                .map_err(store_err)?;
            Ok(())
        })?;
        let mut m = self.mem.write();
        m.providers.insert(provider.id.clone(), provider.clone());
        m.tokens.insert(hashed, provider.id.clone());
        Ok((provider, token))
    }

    /// Replace every token of provider `id` with a new one, which is returned: a token that
    /// leaked stops working the moment the new one is committed.
    pub fn rotate_token(&self, id: &str) -> Result<String, RegistryError> {
        let _writer = self.changing()?;
        let old: Vec<String> = {
            let m = self.mem.read();
            if !m.providers.contains_key(id) {
                return Err(RegistryError::NotFound(format!("provider {id}")));
            }
            m.tokens
                .iter()
                .filter(|(_, p)| p.as_str() == id)
                .map(|(h, _)| h.clone())
                .collect()
        };
        let (token, hashed) = new_token();
        self.write(|w| {
            let mut t = w.open_table(TOKENS).map_err(store_err)?;
            for h in &old {
                t.remove(h.as_str()).map_err(store_err)?;
            }
            t.insert(hashed.as_str(), id).map_err(store_err)?;
            Ok(())
        })?;
        let mut m = self.mem.write();
        for h in &old {
            m.tokens.remove(h);
        }
        m.tokens.insert(hashed, id.to_string());
        Ok(token)
    }

    /// The provider a bearer token belongs to.
    pub fn provider_by_token(&self, token: &str) -> Option<Provider> {
        let m = self.mem.read();
        let id = m.tokens.get(&hash_token(token))?;
        m.providers.get(id).cloned()
    }

    /// All providers.
    pub fn providers(&self) -> Vec<Provider> {
        self.mem.read().providers.values().cloned().collect()
    }

    /// Register or update `host` for `provider`; `Ok(true)` when newly created. `claim` is what
    /// the caller found before its slow checks (DNS, the purge of a new host's old copies):
    /// a host deleted since then is a conflict, not a registration that skipped them.
    pub fn put_origin(
        &self,
        provider: &str,
        host: &str,
        upstream: &str,
        options: OriginOptions,
        claim: Claim,
    ) -> Result<bool, RegistryError> {
        let _writer = self.changing()?;
        let registered_at_ms = {
            let m = self.mem.read();
            match m.origins.get(host) {
                Some(o) if o.provider != provider => {
                    return Err(RegistryError::Forbidden(format!("host {host}")))
                }
                Some(o) => Some(o.registered_at_ms),
                None if claim == Claim::Owned => {
                    return Err(RegistryError::Conflict(format!(
                        "host {host} was deleted while this request ran; send it again"
                    )))
                }
                None => {
                    self.origin_quota(&m, provider, host)?;
                    None
                }
            }
        };
        let created = registered_at_ms.is_none();
        let registered_at_ms = registered_at_ms.unwrap_or_else(crate::clock::wall_ms);
        let origin = origin_row(provider, host, upstream, options, registered_at_ms);
        // A claim left from while approvals were on is settled by the registration.
        self.write(|w| {
            Self::put_json(w, ORIGINS, host, &origin)?;
            if created {
                Self::remove_row(w, HOST_CLAIMS, host)?;
            }
            Ok(())
        })?;
        let mut m = self.mem.write();
        if created {
            m.claims.remove(host);
        }
        m.origins.insert(host.to_string(), origin);
        Ok(created)
    }

    /// Remove `host` (and the provider's resources under it).
    pub fn delete_origin(&self, provider: &str, host: &str) -> Result<(), RegistryError> {
        let _writer = self.changing()?;
        self.check_host_owner(provider, host)?;
        let doomed: Vec<String> = self
            .mem
            .read()
            .resources
            .values()
            .filter(|r| r.host == host)
            .map(|r| r.id.clone())
            .collect();
        self.write(|w| {
            Self::remove_row(w, ORIGINS, host)?;
            let mut t = w.open_table(RESOURCES).map_err(store_err)?;
            for id in &doomed {
                t.remove(id.as_str()).map_err(store_err)?;
            }
            Ok(())
        })?;
        let mut m = self.mem.write();
        m.origins.remove(host);
        for id in &doomed {
            m.remove_resource(id);
        }
        Ok(())
    }

    /// Every origin (what edges and the direct-to-origin fallback need).
    pub fn origins(&self) -> Vec<Origin> {
        self.mem.read().origins.values().cloned().collect()
    }

    /// The origin serving `host`.
    pub fn origin(&self, host: &str) -> Option<Origin> {
        self.mem.read().origins.get(host).cloned()
    }

    /// Whether `host` is registered (without copying its row, as [`Self::origin`] does).
    pub fn has_origin(&self, host: &str) -> bool {
        self.mem.read().origins.contains_key(host)
    }

    /// The cache key of a request for `host` (lower-case, no port) and `path_and_query`, as
    /// the edges key it: the host's query filter applied.
    pub fn cache_key(&self, host: &str, path_and_query: &str) -> String {
        match self.mem.read().origins.get(host) {
            Some(o) => primary_key(host, &o.cache_key_ignore_query.apply(path_and_query)),
            None => primary_key(host, path_and_query),
        }
    }

    /// When `host`'s current registration began, on the broker's clock (seconds; 0 for a
    /// host not registered, or registered before the time was kept): where the request
    /// history its owner may see, and be planned from, starts.
    pub fn registered_since(&self, host: &str) -> u64 {
        self.mem.read().origins.get(host).map_or(0, |o| {
            crate::clock::clock_secs_at_wall_ms(o.registered_at_ms)
        })
    }

    /// Whether `provider` may register `host` as one more host (`Conflict` at its quota):
    /// asked before the work a new host sets off (purging its old copies on every edge) is
    /// done in vain.
    pub fn check_origin_quota(&self, provider: &str, host: &str) -> Result<(), RegistryError> {
        self.origin_quota(&self.mem.read(), provider, host)
    }

    fn origin_quota(&self, m: &Memory, provider: &str, host: &str) -> Result<(), RegistryError> {
        // Approvals turned off since another provider claimed it: the operator settles that
        // claim first, not a registration silently (asked before the API spends a purge).
        if m.claims.get(host).is_some_and(|c| c.provider != provider) {
            return Err(RegistryError::Conflict(format!(
                "host {host} has another provider's claim awaiting approval"
            )));
        }
        // A claim awaiting approval counts (approving it must not exceed the quota), except
        // the provider's own claim on this very host, which the registration settles.
        let held = m
            .origins
            .values()
            .chain(m.claims.values())
            .filter(|o| o.provider == provider && o.host != host)
            .count();
        if held >= self.max_origins_per_provider {
            return Err(RegistryError::Conflict(format!(
                "provider holds {held} hosts, the most allowed ([admin] max_origins_per_provider)"
            )));
        }
        Ok(())
    }

    /// Record `provider`'s claim on `host`, a host nobody has registered, to await the
    /// operator's approval; `Ok(true)` for a new claim, `Ok(false)` when it replaces the
    /// provider's earlier one. Another provider's claim on the host is a conflict: the
    /// operator settles one claim at a time.
    pub fn put_claim(
        &self,
        provider: &str,
        host: &str,
        upstream: &str,
        options: OriginOptions,
    ) -> Result<bool, RegistryError> {
        let _writer = self.changing()?;
        {
            let m = self.mem.read();
            match m.origins.get(host) {
                Some(o) if o.provider != provider => {
                    return Err(RegistryError::Forbidden(format!("host {host}")))
                }
                Some(_) => {
                    return Err(RegistryError::Conflict(format!(
                        "host {host} is registered to this provider already; send it again"
                    )))
                }
                None => {}
            }
            match m.claims.get(host) {
                Some(c) if c.provider != provider => {
                    return Err(RegistryError::Conflict(format!(
                        "host {host} has another provider's claim awaiting approval"
                    )))
                }
                Some(_) => {}
                None => self.origin_quota(&m, provider, host)?,
            }
        }
        let claim = origin_row(provider, host, upstream, options, crate::clock::wall_ms());
        self.write(|w| Self::put_json(w, HOST_CLAIMS, host, &claim))?;
        Ok(self
            .mem
            .write()
            .claims
            .insert(host.to_string(), claim)
            .is_none())
    }

    /// The claim awaiting approval on `host`.
    pub fn claim(&self, host: &str) -> Option<Origin> {
        self.mem.read().claims.get(host).cloned()
    }

    /// How many claims await approval.
    pub fn claim_count(&self) -> usize {
        self.mem.read().claims.len()
    }

    /// Every claim awaiting approval, by host.
    pub fn claims(&self) -> Vec<Origin> {
        self.mem.read().claims.values().cloned().collect()
    }

    /// `provider`'s claims awaiting approval.
    pub fn claims_of(&self, provider: &str) -> Vec<Origin> {
        let m = self.mem.read();
        m.claims
            .values()
            .filter(|c| c.provider == provider)
            .cloned()
            .collect()
    }

    /// Approve the claim on `host` as `seen` (the caller purged the host's old copies from
    /// the edges meanwhile): it becomes the host's origin, registered now. A claim changed or
    /// withdrawn in between is a conflict (approve what is there now).
    pub fn approve_claim(&self, host: &str, seen: &Origin) -> Result<Origin, RegistryError> {
        let _writer = self.changing()?;
        {
            let m = self.mem.read();
            if m.claims.get(host) != Some(seen) || m.origins.contains_key(host) {
                return Err(RegistryError::Conflict(format!(
                    "the claim on host {host} changed while it was being approved"
                )));
            }
        }
        let origin = Origin {
            registered_at_ms: crate::clock::wall_ms(),
            ..seen.clone()
        };
        self.write(|w| {
            Self::put_json(w, ORIGINS, host, &origin)?;
            Self::remove_row(w, HOST_CLAIMS, host)
        })?;
        let mut m = self.mem.write();
        m.claims.remove(host);
        m.origins.insert(host.to_string(), origin.clone());
        Ok(origin)
    }

    /// Remove the claim on `host`: withdrawn by its `provider`, or rejected by the operator
    /// (`None`).
    pub fn drop_claim(&self, host: &str, provider: Option<&str>) -> Result<(), RegistryError> {
        let _writer = self.changing()?;
        match self.mem.read().claims.get(host) {
            None => return Err(RegistryError::NotFound(format!("claim on host {host}"))),
            Some(c) if provider.is_some_and(|p| p != c.provider) => {
                return Err(RegistryError::Forbidden(format!(
                    "the claim on host {host}"
                )))
            }
            Some(_) => {}
        }
        self.write(|w| Self::remove_row(w, HOST_CLAIMS, host))?;
        self.mem.write().claims.remove(host);
        Ok(())
    }

    /// `Ok` when `provider` owns `host`; 403 for another's, 404 for nobody's.
    pub fn check_host_owner(&self, provider: &str, host: &str) -> Result<(), RegistryError> {
        match self.mem.read().origins.get(host) {
            Some(o) if o.provider == provider => Ok(()),
            Some(_) => Err(RegistryError::Forbidden(format!("host {host}"))),
            None => Err(RegistryError::NotFound(format!("host {host}"))),
        }
    }

    /// A fresh resource id.
    pub fn new_resource_id(&self) -> String {
        self.unused_id("r", |m, id| m.resources.contains_key(id))
    }

    /// A random `prefix-<12 hex>` id that `taken` says is free: a collision would overwrite
    /// the holder's row (likely enough among millions of resources to be ruled out).
    fn unused_id(&self, prefix: &str, taken: impl Fn(&Memory, &str) -> bool) -> String {
        loop {
            let id = format!("{prefix}-{}", random_hex(6));
            if !taken(&self.mem.read(), &id) {
                return id;
            }
        }
    }

    /// Insert or replace a resource after checking ownership of it and its host.
    pub fn put_resource(&self, resource: Resource) -> Result<(), RegistryError> {
        self.store_resource(resource, false)
    }

    /// Replace a resource that exists (`NotFound` otherwise), checked under the same lock
    /// as the write: an update racing a delete does not bring the resource back.
    pub fn update_resource(&self, resource: Resource) -> Result<(), RegistryError> {
        self.store_resource(resource, true)
    }

    fn store_resource(&self, resource: Resource, must_exist: bool) -> Result<(), RegistryError> {
        let _writer = self.changing()?;
        if must_exist {
            self.resource(&resource.provider, &resource.id)?;
        }
        self.check_host_owner(&resource.provider, &resource.host)?;
        {
            let m = self.mem.read();
            // One resource per (host, path, match): a second one (a retried create, say)
            // would never resolve, and updates to it would silently do nothing.
            // A resource that keeps its own host, path and match is let through, so that
            // duplicates stored before this check can still be updated.
            let same_place = m.resources.get(&resource.id).is_some_and(|old| {
                (&old.host, &old.path, old.r#match)
                    == (&resource.host, &resource.path, resource.r#match)
            });
            let taken = m
                .by_host
                .get(&resource.host)
                .filter(|_| !same_place)
                .and_then(|h| {
                    let paths = match resource.r#match {
                        PathMatch::Exact => &h.exact,
                        PathMatch::Prefix => &h.prefix,
                    };
                    paths
                        .get(&resource.path)?
                        .iter()
                        .find(|id| **id != resource.id)
                        .cloned()
                });
            if let Some(other) = taken {
                return Err(RegistryError::Conflict(format!(
                    "resource {other} already selects {}{}; update it instead",
                    resource.host, resource.path
                )));
            }
            match m.resources.get(&resource.id) {
                // A new resource's id is drawn before the lock: two creations that drew the
                // same one must not leave one of them silently overwritten.
                Some(_) if !must_exist => {
                    return Err(RegistryError::Conflict(format!(
                        "resource id {} was taken meanwhile; send the request again",
                        resource.id
                    )));
                }
                Some(old) if old.provider != resource.provider => {
                    return Err(RegistryError::Forbidden(format!(
                        "resource {}",
                        resource.id
                    )));
                }
                Some(_) => {}
                None => {
                    let held = m
                        .resources
                        .values()
                        .filter(|r| r.provider == resource.provider)
                        .count();
                    if held >= self.max_resources_per_provider {
                        return Err(RegistryError::Conflict(format!(
                            "provider holds {held} resources, the most allowed \
                             ([admin] max_resources_per_provider)"
                        )));
                    }
                }
            }
        }
        self.write(|w| Self::put_json(w, RESOURCES, &resource.id, &resource))?;
        self.mem.write().insert_resource(resource);
        Ok(())
    }

    /// A resource, if `provider` owns it.
    pub fn resource(&self, provider: &str, id: &str) -> Result<Resource, RegistryError> {
        match self.mem.read().resources.get(id) {
            Some(r) if r.provider == provider => Ok(r.clone()),
            Some(_) => Err(RegistryError::Forbidden(format!("resource {id}"))),
            None => Err(RegistryError::NotFound(format!("resource {id}"))),
        }
    }

    /// Delete a resource `provider` owns.
    pub fn delete_resource(&self, provider: &str, id: &str) -> Result<(), RegistryError> {
        let _writer = self.changing()?;
        self.resource(provider, id)?;
        self.write(|w| {
            w.open_table(RESOURCES)
                .map_err(store_err)?
                .remove(id)
                .map_err(store_err)?;
            Ok(())
        })?;
        self.mem.write().remove_resource(id);
        Ok(())
    }

    /// Resources of one provider.
    pub fn resources_of(&self, provider: &str) -> Vec<Resource> {
        self.mem
            .read()
            .resources
            .values()
            .filter(|r| r.provider == provider)
            .cloned()
            .collect()
    }

    /// The resource that governs the cache key `host/path?query` (a query string does not
    /// select resources).
    pub fn resource_for_key(&self, key: &str) -> Option<Resource> {
        let (host, rest) = key.split_once('/').unwrap_or((key, ""));
        let path = rest.split('?').next().unwrap_or(rest);
        self.resource_for(host, &format!("/{path}"))
    }

    /// The registered resource covering `host` + `path` (exact match first, then the longest
    /// prefix).
    pub fn resource_for(&self, host: &str, path: &str) -> Option<Resource> {
        let m = self.mem.read();
        let id = m.by_host.get(host)?.resolve(path)?;
        m.resources.get(id).cloned()
    }

    /// Origins of one provider.
    pub fn origins_of(&self, provider: &str) -> Vec<Origin> {
        self.mem
            .read()
            .origins
            .values()
            .filter(|o| o.provider == provider)
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::model::{PathMatch, ShadowPolicy};

    #[test]
    fn a_closed_store_needs_no_repair_and_refuses_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.redb");
        let reg = Registry::open(&path).unwrap();
        let (p, _) = reg.create_provider("acme").unwrap();
        reg.close();
        assert!(matches!(
            reg.create_provider("late"),
            Err(RegistryError::Store(m)) if m.contains("closed")
        ));
        // `reg` is never dropped, as when the process ends with `exit`.
        std::mem::forget(reg);
        let repaired = std::rc::Rc::new(std::cell::Cell::new(false));
        let flag = repaired.clone();
        let db = redb::Builder::new()
            .set_repair_callback(move |_| flag.set(true))
            .create(&path)
            .unwrap();
        drop(db);
        assert!(!repaired.get(), "closed cleanly");
        assert_eq!(Registry::open(&path).unwrap().providers()[0].id, p.id);
    }

    #[test]
    fn a_store_dropped_after_a_failure_is_opened_again_for_the_next_change() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.redb");
        let reg = Registry::open(&path).unwrap();
        let (a, _) = reg.create_provider("a").unwrap();
        // What `write` does once redb reports an I/O failure.
        drop(reg.db.write().take());
        let (b, _) = reg.create_provider("b").unwrap();
        reg.close();
        drop(reg);
        let ids: Vec<String> = Registry::open(&path)
            .unwrap()
            .providers()
            .into_iter()
            .map(|p| p.id)
            .collect();
        assert!(ids.contains(&a.id) && ids.contains(&b.id), "{ids:?}");
    }

    /// What a commit reported failed may still have written, written past memory.
    fn write_behind_memory(reg: &Registry, f: impl FnOnce(&redb::WriteTransaction)) {
        let db = reg.db.read();
        let w = db.as_ref().unwrap().begin_write().unwrap();
        f(&w);
        w.commit().unwrap();
    }

    #[test]
    fn after_a_failed_commit_reads_and_checks_see_what_reached_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(&dir.path().join("r.redb")).unwrap();
        let (a, old_token) = reg.create_provider("a").unwrap();
        let (b, _) = reg.create_provider("b").unwrap();
        let up = "http://192.0.2.1";
        // A's registration of h.com and a token rotation, both reported failed, both on disk.
        write_behind_memory(&reg, |w| {
            let row = origin_row(&a.id, "h.com", up, OriginOptions::default(), 1);
            Registry::put_json(w, ORIGINS, "h.com", &row).unwrap();
            let mut t = w.open_table(TOKENS).unwrap();
            t.remove(hash_token(&old_token).as_str()).unwrap();
            t.insert(hash_token("new").as_str(), a.id.as_str()).unwrap();
        });
        reg.store_failed();
        assert!(reg.provider_by_token(&old_token).is_none(), "rotated away");
        assert_eq!(reg.provider_by_token("new").unwrap().id, a.id);
        assert!(matches!(
            reg.put_origin(&b.id, "h.com", up, OriginOptions::default(), Claim::New),
            Err(RegistryError::Forbidden(_))
        ));

        // A resource under h.com on disk only, then a failure that did not reopen the store:
        // deleting the host takes the resource along all the same.
        write_behind_memory(&reg, |w| {
            let r = Resource {
                id: "r-behind".into(),
                provider: a.id.clone(),
                host: "h.com".into(),
                path: "/x".into(),
                r#match: PathMatch::Prefix,
                priority: 5,
                shadow_ttl_secs: 60,
                policy: ShadowPolicy::default(),
            };
            Registry::put_json(w, RESOURCES, &r.id, &r).unwrap();
        });
        drop(reg.db.write().take());
        reg.delete_origin(&a.id, "h.com").unwrap();
        assert!(reg.resources_of(&a.id).is_empty());
        reg.close();
        drop(reg);
        let reg = Registry::open(&dir.path().join("r.redb")).unwrap();
        assert!(reg.resources_of(&a.id).is_empty(), "gone on disk too");
        assert!(reg.origins().is_empty());
    }

    #[test]
    fn a_store_that_is_no_registry_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.redb");
        std::fs::write(&path, vec![0u8; 16 << 10]).unwrap();
        let e = Registry::open(&path).unwrap_err().to_string();
        assert!(e.contains(&path.display().to_string()), "{e}");
        assert_eq!(
            std::fs::read(&path).unwrap(),
            vec![0u8; 16 << 10],
            "left as it was"
        );
        let path = dir.path().join("s.redb");
        drop(Registry::open(&path).unwrap());
        {
            let db = Database::create(&path).unwrap();
            let w = db.begin_write().unwrap();
            w.open_table(RESOURCES)
                .unwrap()
                .insert("r-x", b"{".as_slice())
                .unwrap();
            w.commit().unwrap();
        }
        let e = Registry::open(&path).unwrap_err().to_string();
        assert!(e.contains("\"r-x\"") && e.contains("resources"), "{e}");
    }

    #[test]
    fn a_claim_awaits_approval_apart_from_the_origins_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.redb");
        let (a, b) = {
            let reg = Registry::open(&path)
                .unwrap()
                .with_max_origins_per_provider(1);
            let a = reg.create_provider("a").unwrap().0.id;
            let b = reg.create_provider("b").unwrap().0.id;
            let opts = OriginOptions::default;
            assert!(reg
                .put_claim(&a, "new.com", "http://127.0.0.1:1", opts())
                .unwrap());
            assert!(!reg
                .put_claim(&a, "new.com", "http://127.0.0.1:2", opts())
                .unwrap());
            assert!(reg.origin("new.com").is_none() && reg.origins().is_empty());
            assert!(matches!(
                reg.put_claim(&b, "new.com", "http://127.0.0.1:3", opts()),
                Err(RegistryError::Conflict(_))
            ));
            // The claim counts against a's quota of one host.
            assert!(matches!(
                reg.put_claim(&a, "other.com", "http://127.0.0.1:1", opts()),
                Err(RegistryError::Conflict(m)) if m.contains("max_origins_per_provider")
            ));
            assert!(matches!(
                reg.drop_claim("new.com", Some(&b)),
                Err(RegistryError::Forbidden(_))
            ));
            (a, b)
        };
        let reg = Registry::open(&path).unwrap();
        let claim = reg.claim("new.com").expect("kept on disk");
        assert_eq!(
            (claim.provider.as_str(), claim.upstream.as_str()),
            (a.as_str(), "http://127.0.0.1:2")
        );
        assert_eq!(reg.claims_of(&b), vec![]);
        let mut stale = claim.clone();
        stale.upstream = "http://127.0.0.1:9".into();
        assert!(matches!(
            reg.approve_claim("new.com", &stale),
            Err(RegistryError::Conflict(_))
        ));
        let origin = reg.approve_claim("new.com", &claim).unwrap();
        assert_eq!(reg.origin("new.com"), Some(origin));
        assert!(reg.claims().is_empty());
        assert!(matches!(
            reg.drop_claim("new.com", None),
            Err(RegistryError::NotFound(_))
        ));
        drop(reg);
        let reg = Registry::open(&path).unwrap();
        assert!(reg.claims().is_empty() && reg.origin("new.com").is_some());
        // A registered host takes no claim; a rejected claim is gone.
        assert!(reg
            .put_claim(
                &b,
                "new.com",
                "http://127.0.0.1:1",
                OriginOptions::default()
            )
            .is_err());
        reg.put_claim(&b, "b.com", "http://127.0.0.1:1", OriginOptions::default())
            .unwrap();
        reg.drop_claim("b.com", None).unwrap();
        drop(reg);
        assert!(Registry::open(&path).unwrap().claims().is_empty());
    }

    /// With approvals off again, a provider at its quota can still register the host it
    /// claimed (its claim is not one more host), and the registration settles the claim.
    #[test]
    fn a_claim_is_settled_by_registering_its_host() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(&dir.path().join("r.redb"))
            .unwrap()
            .with_max_origins_per_provider(1);
        let a = reg.create_provider("a").unwrap().0.id;
        let up = "http://127.0.0.1:1";
        reg.put_claim(&a, "c.com", up, OriginOptions::default())
            .unwrap();
        reg.check_origin_quota(&a, "c.com").unwrap();
        assert!(reg.check_origin_quota(&a, "d.com").is_err());
        // Another provider's registration does not silently drop it.
        let b = reg.create_provider("b").unwrap().0.id;
        let e = reg
            .put_origin(&b, "c.com", up, OriginOptions::default(), Claim::New)
            .unwrap_err();
        assert!(matches!(e, RegistryError::Conflict(_)), "{e}");
        assert_eq!(reg.claim_count(), 1);
        assert!(reg
            .put_origin(&a, "c.com", up, OriginOptions::default(), Claim::New)
            .unwrap());
        assert_eq!((reg.claim_count(), reg.origins().len()), (0, 1));
    }

    #[test]
    fn two_providers_claiming_one_host_at_once_leave_one_owner_on_disk_and_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.redb");
        let owners = {
            let reg = std::sync::Arc::new(Registry::open(&path).unwrap());
            let ids: Vec<String> = (0..2)
                .map(|i| reg.create_provider(&format!("p{i}")).unwrap().0.id)
                .collect();
            for round in 0..20 {
                let host = format!("h{round}.com");
                let claims: Vec<_> = ids
                    .iter()
                    .map(|id| {
                        let (reg, id, host) = (reg.clone(), id.clone(), host.clone());
                        std::thread::spawn(move || {
                            reg.put_origin(
                                &id,
                                &host,
                                "http://127.0.0.1:1",
                                OriginOptions::default(),
                                Claim::New,
                            )
                            .is_ok()
                        })
                    })
                    .collect();
                let won: usize = claims
                    .into_iter()
                    .map(|t| usize::from(t.join().unwrap()))
                    .sum();
                assert_eq!(won, 1, "{host}");
            }
            reg.origins()
        };
        assert_eq!(Registry::open(&path).unwrap().origins(), owners);
    }

    #[test]
    fn the_host_index_follows_moves_deletes_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.redb");
        let res = |id: &str, provider: &str, host: &str| Resource {
            id: id.into(),
            provider: provider.into(),
            host: host.into(),
            path: "/x".into(),
            r#match: PathMatch::Prefix,
            priority: 5,
            shadow_ttl_secs: 60,
            policy: ShadowPolicy::default(),
        };
        {
            let reg = Registry::open(&path).unwrap();
            let (p, _) = reg.create_provider("acme").unwrap();
            for h in ["a.com", "b.com"] {
                reg.put_origin(
                    &p.id,
                    h,
                    "http://127.0.0.1:1",
                    OriginOptions::default(),
                    Claim::New,
                )
                .unwrap();
            }
            reg.put_resource(res("r1", &p.id, "a.com")).unwrap();
            assert_eq!(reg.resource_for("a.com", "/x/y").unwrap().id, "r1");
            // A creation never overwrites: its id drawn twice is refused.
            let again = reg.put_resource(res("r1", &p.id, "b.com"));
            assert!(matches!(again, Err(RegistryError::Conflict(m)) if m.contains("taken")));
            // Moved to another host: found there only.
            reg.update_resource(res("r1", &p.id, "b.com")).unwrap();
            assert!(reg.resource_for("a.com", "/x/y").is_none());
            assert_eq!(reg.resource_for("b.com", "/x/y").unwrap().id, "r1");
            reg.put_resource(res("r2", &p.id, "a.com")).unwrap();
            reg.update_resource(res("r2", &p.id, "a.com")).unwrap();
            // A second resource on the same path and match is refused, whoever asks.
            let dup = reg.put_resource(res("r3", &p.id, "a.com"));
            assert!(matches!(dup, Err(RegistryError::Conflict(m)) if m.contains("r2")));
            let moved_onto = reg.update_resource(res("r1", &p.id, "a.com"));
            assert!(matches!(moved_onto, Err(RegistryError::Conflict(_))));
            reg.delete_resource(&p.id, "r2").unwrap();
            assert!(reg.resource_for("a.com", "/x/y").is_none());
            // An update that lost the race with a delete does not bring the resource back.
            assert!(matches!(
                reg.update_resource(res("r2", &p.id, "a.com")),
                Err(RegistryError::NotFound(_))
            ));
            assert!(reg.resource_for("a.com", "/x/y").is_none());
        }
        // A provider at its limit may update what it has, not add more.
        let reg = Registry::open(&path)
            .unwrap()
            .with_max_resources_per_provider(1)
            .with_max_origins_per_provider(2);
        let p = reg.providers().pop().unwrap();
        assert_eq!(reg.origins().len(), 2, "a.com and b.com");
        assert!(!reg
            .put_origin(
                &p.id,
                "b.com",
                "http://127.0.0.1:3",
                OriginOptions::default(),
                Claim::Owned
            )
            .unwrap());
        assert!(matches!(
            reg.put_origin(
                &p.id,
                "c.com",
                "http://127.0.0.1:3",
                OriginOptions::default(),
                Claim::New
            ),
            Err(RegistryError::Conflict(_))
        ));
        // The API asks first, before it purges a new host's old copies from every edge.
        assert!(matches!(
            reg.check_origin_quota(&p.id, "new.com"),
            Err(RegistryError::Conflict(_))
        ));
        reg.update_resource(res("r1", &p.id, "b.com")).unwrap();
        assert!(matches!(
            reg.put_resource(res("r3", &p.id, "b.com")),
            Err(RegistryError::Conflict(_))
        ));
        drop(reg);
        let reg = Registry::open(&path).unwrap();
        assert_eq!(reg.resource_for("b.com", "/x/y").unwrap().id, "r1");
        assert!(reg.resource_for("a.com", "/x").is_none());
    }

    #[test]
    fn providers_tokens_origins_resources_persist() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.redb");
        let (p, token, rid) = {
            let reg = Registry::open(&path).unwrap();
            let (p, token) = reg.create_provider("acme").unwrap();
            let before = crate::clock::wall_ms();
            assert!(reg
                .put_origin(
                    &p.id,
                    "a.com",
                    "http://127.0.0.1:1",
                    OriginOptions::default(),
                    Claim::New
                )
                .unwrap());
            let registered = reg.origin("a.com").unwrap().registered_at_ms;
            assert!((before..=crate::clock::wall_ms()).contains(&registered));
            std::thread::sleep(std::time::Duration::from_millis(2));
            assert!(!reg
                .put_origin(
                    &p.id,
                    "a.com",
                    "http://127.0.0.1:2",
                    OriginOptions {
                        forward_host: true,
                        strip_set_cookie: true,
                        cache_key_ignore_query: edge_node::cache_key::QueryFilter::parse(&[
                            "utm_*".into()
                        ])
                        .unwrap(),
                    },
                    Claim::Owned
                )
                .unwrap());
            assert_eq!(
                reg.origin("a.com").unwrap().registered_at_ms,
                registered,
                "an update keeps the registration time"
            );
            let rid = reg.new_resource_id();
            reg.put_resource(Resource {
                id: rid.clone(),
                provider: p.id.clone(),
                host: "a.com".into(),
                path: "/x".into(),
                r#match: PathMatch::Exact,
                priority: 5,
                shadow_ttl_secs: 60,
                policy: ShadowPolicy::default(),
            })
            .unwrap();
            (p, token, rid)
        };
        let reg = Registry::open(&path).unwrap();
        assert_eq!(reg.provider_by_token(&token).unwrap(), p);
        assert!(reg.provider_by_token("scdn_wrong").is_none());

        // A rotated token replaces the old one, in memory and on disk.
        let rotated = reg.rotate_token(&p.id).unwrap();
        assert!(reg.provider_by_token(&token).is_none());
        assert_eq!(reg.provider_by_token(&rotated).unwrap(), p);
        assert!(matches!(
            reg.rotate_token("p-missing"),
            Err(RegistryError::NotFound(_))
        ));
        drop(reg);
        let reg = Registry::open(&path).unwrap();
        assert!(reg.provider_by_token(&token).is_none());
        assert_eq!(reg.provider_by_token(&rotated).unwrap(), p);
        assert_eq!(reg.origin("a.com").unwrap().upstream, "http://127.0.0.1:2");
        assert!(reg.origin("a.com").unwrap().forward_host);
        assert!(reg.origin("a.com").unwrap().strip_set_cookie);
        assert_eq!(
            reg.cache_key("a.com", "/p?utm_source=x&id=1"),
            "a.com/p?id=1"
        );
        assert_eq!(
            reg.cache_key("b.com", "/p?utm_source=x"),
            "b.com/p?utm_source=x"
        );
        assert_eq!(reg.resource(&p.id, &rid).unwrap().path, "/x");

        let (q, _) = reg.create_provider("other").unwrap();
        assert!(matches!(
            reg.put_origin(
                &q.id,
                "a.com",
                "http://x",
                OriginOptions::default(),
                Claim::New
            ),
            Err(RegistryError::Forbidden(_))
        ));
        assert!(matches!(
            reg.resource(&q.id, &rid),
            Err(RegistryError::Forbidden(_))
        ));
        assert!(matches!(
            reg.delete_origin(&q.id, "a.com"),
            Err(RegistryError::Forbidden(_))
        ));
        let first = reg.origin("a.com").unwrap().registered_at_ms;
        reg.delete_origin(&p.id, "a.com").unwrap();
        assert!(matches!(
            reg.resource(&p.id, &rid),
            Err(RegistryError::NotFound(_))
        ));
        assert!(
            matches!(
                reg.put_origin(
                    &p.id,
                    "a.com",
                    "http://x",
                    OriginOptions::default(),
                    Claim::Owned
                ),
                Err(RegistryError::Conflict(_))
            ),
            "an update of a host deleted meanwhile is not a registration"
        );
        assert!(reg.origin("a.com").is_none());
        reg.put_origin(
            &q.id,
            "a.com",
            "http://x",
            OriginOptions::default(),
            Claim::New,
        )
        .unwrap();
        assert!(
            reg.origin("a.com").unwrap().registered_at_ms > first,
            "a new owner's registration starts a new floor"
        );
    }

    /// The index answers what a scan of every resource of the host answers: an exact match
    /// first, else the longest prefix, ties to the smallest id.
    #[test]
    fn the_path_index_resolves_as_a_full_scan_does() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let paths = [
            "/", "/a", "/a/", "/a/b", "/ab", "/a/bc", "/b", "/é", "/é/x", "/a/b/c",
        ];
        let mut idx = HostIndex::default();
        let mut all: Vec<Resource> = Vec::new();
        for i in 0..40 {
            let r = Resource {
                id: format!("r{:02}", rng.gen_range(0..30)),
                provider: "p".into(),
                host: "h".into(),
                path: paths[rng.gen_range(0..paths.len())].into(),
                r#match: if rng.gen_bool(0.5) {
                    PathMatch::Exact
                } else {
                    PathMatch::Prefix
                },
                priority: 5,
                shadow_ttl_secs: 60,
                policy: ShadowPolicy::default(),
            };
            if let Some(old) = all.iter().position(|o| o.id == r.id) {
                idx.remove(&all.remove(old));
            }
            if i % 7 == 6 && !all.is_empty() {
                idx.remove(&all.remove(0));
            }
            idx.add(&r);
            all.push(r);
            for q in [
                "/", "/a", "/a/b", "/a/bz", "/abc", "/a/b/c/d", "/b/x", "/c", "/é/xy", "/éa", "",
            ] {
                let scan = all
                    .iter()
                    .filter(|r| match r.r#match {
                        PathMatch::Exact => r.path == q,
                        PathMatch::Prefix => q.starts_with(&r.path),
                    })
                    .min_by_key(|r| {
                        (
                            r.r#match != PathMatch::Exact,
                            std::cmp::Reverse(r.path.len()),
                            r.id.clone(),
                        )
                    })
                    .map(|r| r.id.clone());
                assert_eq!(idx.resolve(q).cloned(), scan, "{q:?} after {i} changes");
            }
        }
    }
}
