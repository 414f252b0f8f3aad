//! The cache while the objects are being listed, and a pass for what
//! changes meanwhile.
//!
//! A start (or a new leader) lists every object before it watches, and
//! kube-runtime's controller holds every pass until that list is in its
//! cache. With 10,000 objects the list alone takes about a second (27 MB of
//! JSON, most of it managed fields and `kubectl apply`'s copy of the
//! manifest), and a list cannot return what was created after it began. So
//! an object created right after a restart would wait for the whole list and
//! then for the watch that follows it.
//!
//! Instead, beside the list, a second watch starts from the moment of the
//! start (the collection's current resource version, from a one-item list of
//! metadata). What it sees goes into the cache and is queued at once, and the
//! controller's cache is marked ready from the beginning, so that pass runs
//! while the list is still being read. The listed objects that need a pass
//! are queued once the list is in the cache, as before.
//!
//! Two copies of one object can then arrive out of order: the list (read
//! from the API server's watch cache, which may lag) and the watch that
//! follows it may hold older versions than the early watch already saw.
//! Resource versions of one resource are comparable integers (KEP-5504,
//! stable in Kubernetes 1.35, and etcd revisions before that), so the older
//! copy is never let over the newer one. An API server whose versions are
//! not integers gets no early watch: the list and watch alone, as before.

use std::collections::HashMap;
use std::sync::Arc;

use futures::stream::{self, BoxStream};
use futures::{Stream, StreamExt};
use kube::api::{Api, ListParams, WatchEvent, WatchParams};
use kube::runtime::reflector::store::Writer;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher::{self, Event};

use super::resync::{in_sync_at_start, trim};
use crate::resource::DedicatedLicense;

type Key = ObjectRef<DedicatedLicense>;

/// The version of an object, if it is comparable.
fn version(dl: &DedicatedLicense) -> Option<u64> {
    comparable(dl.metadata.resource_version.as_deref()?)
}

/// A resource version as a number, if it is comparable: a positive integer
/// without leading zeros, as KEP-5504 defines it.
fn comparable(rv: &str) -> Option<u64> {
    if rv.starts_with('0') || !rv.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    rv.parse().ok()
}

/// The watch from the moment of the start: the collection's current
/// resource version (a consistent read of one item's metadata), then a watch
/// from there. Ends on the first error, or when the versions are not
/// comparable.
pub fn early_watch(api: Api<DedicatedLicense>) -> impl Stream<Item = WatchEvent<DedicatedLicense>> {
    stream::once(async move {
        let list = api.list_metadata(&ListParams::default().limit(1)).await;
        let rv = match list {
            Ok(list) => list.metadata.resource_version.unwrap_or_default(),
            Err(e) => {
                tracing::debug!(error = %e, "no early watch");
                return None;
            }
        };
        if comparable(&rv).is_none() {
            tracing::debug!(resource_version = %rv, "no early watch: versions are not comparable");
            return None;
        }
        match api.watch(&WatchParams::default().timeout(290), &rv).await {
            Ok(events) => Some(events),
            Err(e) => {
                tracing::debug!(error = %e, "no early watch");
                None
            }
        }
    })
    .filter_map(std::future::ready)
    .flatten()
    .take_while(|event| std::future::ready(event.is_ok()))
    .filter_map(|event| std::future::ready(event.ok()))
}

/// The watcher's events reflected into `writer`, with the early watch merged
/// in while the list is read. What comes out is for the controller: the
/// changes the early watch saw, `InitDone` once the list is in the cache,
/// then the listed objects that need a pass (as `Apply`), then the watch.
/// `Init` and `InitApply` are kept to the cache. The store of `writer` reads
/// ready from the start (module documentation).
pub fn reflect<M, E>(
    main: M,
    early: E,
    writer: Writer<DedicatedLicense>,
) -> impl Stream<Item = Result<Event<DedicatedLicense>, watcher::Error>> + Send
where
    M: Stream<Item = Result<Event<DedicatedLicense>, watcher::Error>> + Send + 'static,
    E: Stream<Item = WatchEvent<DedicatedLicense>> + Send + 'static,
{
    enum Next {
        Early(Option<WatchEvent<DedicatedLicense>>),
        Main(Option<Result<Event<DedicatedLicense>, watcher::Error>>),
    }
    struct State {
        merge: Merge,
        main: BoxStream<'static, Result<Event<DedicatedLicense>, watcher::Error>>,
        early: Option<BoxStream<'static, WatchEvent<DedicatedLicense>>>,
    }
    let state = State {
        merge: Merge::new(writer),
        main: main.boxed(),
        early: Some(early.boxed()),
    };
    stream::unfold(state, |mut s| async move {
        loop {
            if let Some(dl) = s.merge.queued.pop() {
                return Some((Ok(Event::Apply((*dl).clone())), s));
            }
            let next = match s.early.as_mut() {
                Some(early) => tokio::select! {
                    biased;
                    event = early.next() => Next::Early(event),
                    event = s.main.next() => Next::Main(event),
                },
                None => Next::Main(s.main.next().await),
            };
            let out = match next {
                Next::Early(None) => {
                    s.early = None;
                    None
                }
                Next::Early(Some(event)) => s.merge.early(event),
                Next::Main(None) => return None,
                Next::Main(Some(Err(e))) => return Some((Err(e), s)),
                Next::Main(Some(Ok(event))) => {
                    if matches!(event, Event::InitDone) {
                        s.early = None;
                    }
                    s.merge.main(event)
                }
            };
            if let Some(out) = out {
                return Some((Ok(out), s));
            }
        }
    })
}

/// The cache's side of [`reflect`]: which copy of an object wins.
struct Merge {
    writer: Writer<DedicatedLicense>,
    store: Store<DedicatedLicense>,
    /// What the early watch saw, by object: its version, and the object
    /// (`None`: deleted). Kept until the list is in the cache.
    early: HashMap<Key, (u64, Option<DedicatedLicense>)>,
    /// After that, the versions alone, until the watch that follows the
    /// list brings something newer.
    newest: HashMap<Key, u64>,
    /// Listed objects that need a pass, once the list is in the cache.
    queued: Vec<Arc<DedicatedLicense>>,
}

impl Merge {
    fn new(mut writer: Writer<DedicatedLicense>) -> Merge {
        // kube-runtime's controller starts no pass until its store has
        // seen a first InitDone; an empty one, so it need not wait for
        // the list (the list's own InitDone fills the store as usual).
        writer.apply_watcher_event(&Event::Init);
        writer.apply_watcher_event(&Event::InitDone);
        let store = writer.as_reader();
        Merge {
            writer,
            store,
            early: HashMap::new(),
            newest: HashMap::new(),
            queued: Vec::new(),
        }
    }

    /// An event of the early watch: into the cache and queued.
    fn early(&mut self, event: WatchEvent<DedicatedLicense>) -> Option<Event<DedicatedLicense>> {
        let (mut dl, deleted) = match event {
            WatchEvent::Added(dl) | WatchEvent::Modified(dl) => (dl, false),
            WatchEvent::Deleted(dl) => (dl, true),
            WatchEvent::Bookmark(_) | WatchEvent::Error(_) => return None,
        };
        trim(&mut dl);
        let version = version(&dl)?;
        let key = ObjectRef::from_obj(&dl);
        let event = if deleted {
            self.early.insert(key, (version, None));
            Event::Delete(dl)
        } else {
            self.early.insert(key, (version, Some(dl.clone())));
            Event::Apply(dl)
        };
        self.writer.apply_watcher_event(&event);
        Some(event)
    }

    /// An event of the list and watch: into the cache unless the early
    /// watch saw a newer copy; what the controller is to see of it.
    fn main(&mut self, event: Event<DedicatedLicense>) -> Option<Event<DedicatedLicense>> {
        match event {
            Event::Init => {
                self.writer.apply_watcher_event(&Event::Init);
                None
            }
            Event::InitApply(dl) => {
                let listed = match self.early.get(&ObjectRef::from_obj(&dl)) {
                    Some((seen, newer)) if version(&dl).is_none_or(|v| v <= *seen) => newer.clone(),
                    _ => Some(dl),
                };
                if let Some(dl) = listed {
                    self.writer.apply_watcher_event(&Event::InitApply(dl));
                }
                None
            }
            Event::InitDone => {
                self.listed();
                Some(Event::InitDone)
            }
            Event::Apply(ref dl) | Event::Delete(ref dl) => {
                let key = ObjectRef::from_obj(dl);
                if let Some(seen) = self.newest.get(&key) {
                    if version(dl).is_none_or(|v| v <= *seen) {
                        return None;
                    }
                    self.newest.remove(&key);
                }
                self.writer.apply_watcher_event(&event);
                Some(event)
            }
        }
    }

    /// The list is in: the cache takes it, what the early watch saw after
    /// the list was read goes back in, and the objects that need a pass
    /// are [`Merge::queued`].
    fn listed(&mut self) {
        self.writer.apply_watcher_event(&Event::InitDone);
        for (key, (seen, dl)) in std::mem::take(&mut self.early) {
            let cached = self.store.get(&key);
            let older = cached
                .as_deref()
                .is_none_or(|c| version(c).is_none_or(|v| v < seen));
            match (dl, cached) {
                (Some(dl), _) if older => self.writer.apply_watcher_event(&Event::Apply(dl)),
                (None, Some(cached)) if older => self
                    .writer
                    .apply_watcher_event(&Event::Delete((*cached).clone())),
                _ => {}
            }
            self.newest.insert(key, seen);
        }
        self.queued = self.store.state();
        self.queued.retain(|dl| !in_sync_at_start(dl));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::ResourceExt;
    use kube::runtime::reflector;

    fn object(name: &str, rv: u64, count: i64) -> DedicatedLicense {
        let mut dl: DedicatedLicense = serde_yaml::from_str(&format!(
            "apiVersion: licensor.dev/v1alpha1\nkind: DedicatedLicense\n\
             metadata: {{name: {name}, namespace: ns, resourceVersion: '{rv}', generation: 1}}\n\
             spec: {{organization: {name}, product: TestOps, count: {count}}}\n"
        ))
        .unwrap();
        dl.metadata.uid = Some(format!("uid-{name}"));
        dl
    }

    fn cached(store: &Store<DedicatedLicense>, name: &str) -> Option<(String, i64)> {
        store
            .get(&ObjectRef::new(name).within("ns"))
            .map(|dl| (dl.metadata.resource_version.clone().unwrap(), dl.spec.count))
    }

    fn merge() -> (Merge, Store<DedicatedLicense>) {
        let (reader, writer) = reflector::store();
        (Merge::new(writer), reader)
    }

    fn applied(event: Option<Event<DedicatedLicense>>) -> Option<(String, i64)> {
        match event? {
            Event::Apply(dl) => Some((dl.metadata.resource_version.unwrap(), dl.spec.count)),
            _ => None,
        }
    }

    #[test]
    fn the_store_is_ready_before_the_list() {
        let (_merge, store) = merge();
        let ready = futures::FutureExt::now_or_never(store.wait_until_ready());
        assert!(matches!(ready, Some(Ok(()))));
    }

    #[test]
    fn an_object_created_while_listing_is_cached_and_queued_at_once_and_kept() {
        let (mut m, store) = merge();
        m.main(Event::Init);
        m.main(Event::InitApply(object("a", 10, 1)));
        let out = m.early(WatchEvent::Added(object("new", 20, 5)));
        assert_eq!(applied(out), Some(("20".into(), 5)));
        assert_eq!(cached(&store, "new"), Some(("20".into(), 5)));
        // The list was read before "new" existed; it stays cached.
        m.main(Event::InitApply(object("b", 11, 1)));
        assert!(matches!(m.main(Event::InitDone), Some(Event::InitDone)));
        assert_eq!(cached(&store, "new"), Some(("20".into(), 5)));
        assert_eq!(cached(&store, "a"), Some(("10".into(), 1)));
        // The watch that follows the list replays its creation: not again.
        assert!(m.main(Event::Apply(object("new", 20, 5))).is_none());
        // A later change goes through.
        let out = m.main(Event::Apply(object("new", 30, 6)));
        assert_eq!(applied(out), Some(("30".into(), 6)));
        assert_eq!(cached(&store, "new"), Some(("30".into(), 6)));
    }

    #[test]
    fn an_older_listed_or_replayed_copy_never_replaces_a_newer_one() {
        let (mut m, store) = merge();
        m.main(Event::Init);
        m.early(WatchEvent::Modified(object("a", 20, 7)));
        // The list came from a cache that lagged: count 1 at version 10.
        m.main(Event::InitApply(object("a", 10, 1)));
        m.main(Event::InitDone);
        assert_eq!(cached(&store, "a"), Some(("20".into(), 7)));
        // Its watch replays version 15 first.
        assert!(m.main(Event::Apply(object("a", 15, 2))).is_none());
        assert_eq!(cached(&store, "a"), Some(("20".into(), 7)));
    }

    #[test]
    fn an_object_deleted_while_listing_stays_deleted() {
        let (mut m, store) = merge();
        m.main(Event::Init);
        let out = m.early(WatchEvent::Deleted(object("gone", 20, 1)));
        assert!(matches!(out, Some(Event::Delete(_))));
        m.main(Event::InitApply(object("gone", 10, 1)));
        m.main(Event::InitApply(object("kept", 12, 1)));
        m.main(Event::InitDone);
        assert_eq!(cached(&store, "gone"), None);
        assert_eq!(cached(&store, "kept"), Some(("12".into(), 1)));
    }

    #[test]
    fn a_listed_copy_newer_than_the_early_one_wins() {
        let (mut m, store) = merge();
        m.main(Event::Init);
        m.early(WatchEvent::Added(object("a", 20, 1)));
        m.main(Event::InitApply(object("a", 25, 2)));
        m.main(Event::InitDone);
        assert_eq!(cached(&store, "a"), Some(("25".into(), 2)));
    }

    #[test]
    fn the_listed_objects_that_need_a_pass_are_queued_once_cached() {
        let (mut m, store) = merge();
        m.main(Event::Init);
        m.main(Event::InitApply(object("new", 10, 1)));
        // Ready for its generation, with its finalizer: the walker's.
        let mut in_sync = object("in-sync", 11, 1);
        in_sync.metadata.finalizers = Some(vec![crate::resource::FINALIZER.into()]);
        in_sync.status = Some(
            serde_yaml::from_str(
                "{observedGeneration: 1, conditions: [{type: Ready, status: 'True', \
                 reason: InSync, message: in sync, lastTransitionTime: '2026-11-28T12:00:00Z'}]}",
            )
            .unwrap(),
        );
        m.main(Event::InitApply(in_sync));
        assert_eq!(cached(&store, "new"), None, "not before the list is in");
        m.main(Event::InitDone);
        let queued: Vec<String> = m.queued.iter().map(|dl| dl.name_any()).collect();
        assert_eq!(queued, ["new"]);
        assert_eq!(cached(&store, "new"), Some(("10".into(), 1)));
        assert_eq!(cached(&store, "in-sync"), Some(("11".into(), 1)));
    }

    #[test]
    fn versions_are_compared_only_when_they_are_integers() {
        assert_eq!(version(&object("a", 42, 1)), Some(42));
        let mut dl = object("a", 1, 1);
        for rv in ["007", "abc", "", "-1"] {
            dl.metadata.resource_version = Some(rv.into());
            assert_eq!(version(&dl), None, "{rv:?}");
        }
    }
}
