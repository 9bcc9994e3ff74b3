//! Live feeds of a topic for push channels (WebSocket, SSE): each subscriber follows the log from its
//! own cursor, fed from a shared live path while it keeps up and from the log when it does not.
//!
//! A [`Hub`] per topic (started by its first subscriber, stopped after its last) reads events once
//! as they become durable, renders each to JSON once, and broadcasts them to every subscriber of the
//! topic through a ring of fixed capacity. A [`Feed`] is one subscriber: it takes events from the
//! ring while it keeps up; when it falls more than the ring behind (or sees a gap), it reads the
//! missing events from the log instead, then rejoins the ring. Memory per subscriber is bounded by
//! one page of the log, however far behind it is. A feed that stays behind for longer than its
//! limit ends with [`FeedError::SlowConsumer`].
//!
//! Pages read while catching up start at multiples of the page size and are shared through a
//! bounded [`PageCache`]: subscribers that fall behind together (a fan-out the machine cannot keep
//! up with, or many clients resuming after a restart) decode and render each page once.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures_util::future::select_all;
use spate_log::{Partition, Topic};
use tokio::sync::broadcast;

use crate::filter::{Filter, FilterInput, Verdict};
use crate::{Broker, BrokerError, Event, Result, blocking, read_events};

/// Events the live ring of a topic holds; a subscriber further behind reads from the log.
pub const LIVE_RING_EVENTS: usize = 4096;
/// Events read from the log per page while catching up.
const CATCH_UP_PAGE_EVENTS: usize = 256;
/// What the shared catch-up pages may hold in all, about (see [`PageCache`]).
const PAGE_CACHE_BYTES: usize = 64 << 20;
/// New events the live path reads without leaving the runtime's thread.
const LIVE_INLINE_EVENTS: u64 = CATCH_UP_PAGE_EVENTS as u64;

/// An event on its way to subscribers, rendered once.
#[derive(Debug)]
pub struct LiveEvent {
    pub partition: u32,
    pub offset: u64,
    pub event: Event,
    /// The event in CloudEvents JSON format.
    pub json: String,
    /// When the event was seen durable (for latency metrics).
    pub seen_at: Instant,
    input: OnceLock<FilterInput>,
    /// Whether `json` spans lines (JSON data stored as sent may have line breaks between its
    /// tokens), found once rather than by every subscriber that writes it out.
    line_breaks: bool,
}

impl LiveEvent {
    pub fn new(partition: u32, offset: u64, event: Event) -> LiveEvent {
        let json = event.json_string();
        let line_breaks = json.bytes().any(|b| b == b'\n' || b == b'\r');
        LiveEvent {
            partition,
            offset,
            event,
            json,
            seen_at: Instant::now(),
            input: OnceLock::new(),
            line_breaks,
        }
    }

    /// Whether [`LiveEvent::json`] holds a line break.
    pub fn json_has_line_breaks(&self) -> bool {
        self.line_breaks
    }

    /// The event's CEL variables, built at most once however many filters look at it.
    pub fn input(&self) -> &FilterInput {
        self.input.get_or_init(|| FilterInput::new(&self.event))
    }
}

/// The live path of one topic.
struct Hub {
    id: u64,
    sender: broadcast::Sender<Arc<LiveEvent>>,
}

/// The hubs of the topics that have subscribers.
#[derive(Default)]
pub(crate) struct Hubs {
    hubs: Mutex<HashMap<String, Hub>>,
    next_id: std::sync::atomic::AtomicU64,
    pages: Arc<PageCache>,
}

/// A page of one partition read for catching up, rendered once: events from the page's first
/// offset (a multiple of [`CATCH_UP_PAGE_EVENTS`]) up to `next_offset`.
struct Page {
    events: Vec<Arc<LiveEvent>>,
    next_offset: u64,
}

/// Topic name, topic creation time, partition, first offset.
type PageKey = (String, i64, u32, u64);

/// Catch-up pages shared by feeds, the oldest dropped first past [`PAGE_CACHE_BYTES`] (a page in
/// use stays alive with its users). Feeds that want a page being read wait for that read.
#[derive(Default)]
pub(crate) struct PageCache {
    inner: Mutex<PageCacheInner>,
}

#[derive(Default)]
struct PageCacheInner {
    pages: HashMap<PageKey, Arc<tokio::sync::OnceCell<Arc<Page>>>>,
    /// Pages read, oldest first, with their size.
    order: VecDeque<(PageKey, usize)>,
    bytes: usize,
}

impl PageCache {
    /// The page of partition `i` of `topic` that starts at `first`, read if no feed has.
    async fn page(&self, topic: &Arc<Topic>, i: u32, first: u64) -> Result<Arc<Page>> {
        let key: PageKey = (topic.name.clone(), topic.created_ms, i, first);
        let cell = {
            let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            inner.pages.entry(key.clone()).or_default().clone()
        };
        let mut read_here = false;
        let page = cell
            .get_or_try_init(|| {
                read_here = true;
                let (p, name) = (topic.partitions[i as usize].clone(), topic.name.clone());
                blocking(move || {
                    let page = read_events(&p, &name, i, first, CATCH_UP_PAGE_EVENTS)?;
                    Ok(Arc::new(Page {
                        events: page
                            .events
                            .into_iter()
                            .map(|e| Arc::new(LiveEvent::new(e.partition, e.offset, e.event)))
                            .collect(),
                        next_offset: page.next_offset,
                    }))
                })
            })
            .await;
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        match &page {
            Ok(page) if read_here => {
                let size = page
                    .events
                    .iter()
                    .map(|e| 2 * e.json.len() + 256)
                    .sum::<usize>();
                inner.order.push_back((key, size));
                inner.bytes += size;
                while inner.bytes > PAGE_CACHE_BYTES
                    && let Some((old, size)) = inner.order.pop_front()
                {
                    inner.pages.remove(&old);
                    inner.bytes -= size;
                }
            }
            Ok(_) => {}
            Err(_) => {
                // Nothing kept for a read that failed: the next feed tries again.
                if inner
                    .pages
                    .get(&key)
                    .is_some_and(|c| Arc::ptr_eq(c, &cell) && !c.initialized())
                {
                    inner.pages.remove(&key);
                }
            }
        }
        page.cloned()
    }
}

/// Where a feed starts.
#[derive(Debug, Clone)]
pub enum FeedStart {
    Earliest,
    Latest,
    /// The first event at or after this time (ms since the epoch) in each partition.
    Time(i64),
    /// The next offset to deliver, per partition; partitions not listed start at the latest.
    Offsets(HashMap<u32, u64>),
    /// Offsets handed out by the topic created at `topic_created_ms`: they count when the topic
    /// under the name is still that one; when it was deleted and created again since, they say
    /// nothing about the new topic, which is then read from its start.
    Resume {
        offsets: HashMap<u32, u64>,
        topic_created_ms: i64,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    #[error("subscriber stayed behind the live tail for more than {0:?}")]
    SlowConsumer(Duration),
    #[error("topic {0} was deleted")]
    TopicDeleted(String),
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

/// The stream a feed is narrowed to.
struct StreamScope {
    key: String,
    next_version: u64,
    from_version: u64,
}

/// One subscriber's view of a topic: the events after its cursor that pass its filter, in offset
/// order within each partition, each exactly once.
pub struct Feed {
    topic: Arc<Topic>,
    /// The next offset to look at, per partition.
    cursor: Vec<u64>,
    /// The offset after the last event handed out, per partition (the start before any).
    position: Vec<u64>,
    /// Events below these offsets exist and must be read from the log (catching up).
    target: Vec<u64>,
    rx: broadcast::Receiver<Arc<LiveEvent>>,
    pages: Arc<PageCache>,
    filter: Arc<Filter>,
    ready: VecDeque<(Arc<LiveEvent>, Option<u64>)>,
    /// For a feed of one stream: its key and the version of its next event.
    stream: Option<StreamScope>,
    /// The stream version of the event last handed out.
    version: Option<u64>,
    behind_since: Option<Instant>,
    max_behind: Duration,
}

impl Broker {
    /// Subscribes to `topic` from `start`; events that do not pass `filter` are skipped.
    pub async fn feed(
        self: &Arc<Self>,
        topic: &str,
        start: FeedStart,
        filter: Arc<Filter>,
        max_behind: Duration,
    ) -> Result<Feed> {
        let topic = self.topic(topic)?;
        let start = match start {
            FeedStart::Resume {
                offsets,
                topic_created_ms,
            } if topic_created_ms == topic.created_ms => FeedStart::Offsets(offsets),
            FeedStart::Resume { .. } => FeedStart::Earliest,
            start => start,
        };
        for (p, _) in match &start {
            FeedStart::Offsets(m) => m.iter().collect::<Vec<_>>(),
            _ => Vec::new(),
        } {
            topic.partition(*p)?;
        }
        // Join the live path first, then take the positions: an event that becomes durable after
        // this reaches the ring after the subscription, so none falls between the two.
        let rx = self.live(&topic);
        let partitions = topic.partitions.clone();
        let start_for_blocking = start.clone();
        let cursor = blocking(move || {
            partitions
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let hw = p.high_watermark();
                    Ok(match &start_for_blocking {
                        // (A resume is an `Offsets` or `Earliest` by now.)
                        FeedStart::Earliest | FeedStart::Resume { .. } => p.log_start_offset(),
                        FeedStart::Latest => hw,
                        FeedStart::Time(t) => p.offset_for_timestamp(*t)?.map_or(hw, |(o, _)| o),
                        FeedStart::Offsets(m) => match m.get(&(i as u32)) {
                            // Past the end: the position was not handed out by this log (its
                            // data or topic was replaced); waiting there would deliver nothing
                            // until the partition grew that far.
                            Some(&o) if o > hw => {
                                return Err(spate_log::Error::OffsetOutOfRange {
                                    offset: o,
                                    log_start_offset: p.log_start_offset(),
                                    high_watermark: hw,
                                }
                                .into());
                            }
                            Some(&o) => o,
                            None => hw,
                        },
                    })
                })
                .collect::<Result<Vec<u64>>>()
        })
        .await?;
        let target = topic
            .partitions
            .iter()
            .map(|p| p.high_watermark())
            .collect();
        Ok(Feed {
            topic,
            position: cursor.clone(),
            cursor,
            target,
            rx,
            pages: self.hubs.pages.clone(),
            filter,
            ready: VecDeque::new(),
            stream: None,
            version: None,
            behind_since: None,
            max_behind,
        })
    }

    /// A receiver on the topic's live ring, starting the hub when it is the first.
    fn live(self: &Arc<Self>, topic: &Arc<Topic>) -> broadcast::Receiver<Arc<LiveEvent>> {
        let mut hubs = self.hubs.hubs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = hubs.get(&topic.name) {
            return h.sender.subscribe();
        }
        let (sender, rx) = broadcast::channel(LIVE_RING_EVENTS);
        let id = self
            .hubs
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // The hub starts at the current high watermarks, taken before anyone subscribes.
        let next: Vec<u64> = topic
            .partitions
            .iter()
            .map(|p| p.high_watermark())
            .collect();
        hubs.insert(
            topic.name.clone(),
            Hub {
                id,
                sender: sender.clone(),
            },
        );
        tokio::spawn(run_hub(self.clone(), topic.clone(), id, sender, next));
        rx
    }

    /// How many feeds of `topic` hold a place on its live ring now (for diagnostics and tests).
    pub fn live_feeds(&self, topic: &str) -> usize {
        let hubs = self.hubs.hubs.lock().unwrap_or_else(|e| e.into_inner());
        hubs.get(topic).map_or(0, |h| h.sender.receiver_count())
    }

    fn stop_hub_if_unused(&self, name: &str, id: u64, force: bool) -> bool {
        let mut hubs = self.hubs.hubs.lock().unwrap_or_else(|e| e.into_inner());
        let Some(h) = hubs.get(name) else { return true };
        if h.id != id {
            return true;
        }
        if force || h.sender.receiver_count() == 0 {
            hubs.remove(name);
            return true;
        }
        false
    }
}

/// Reads each partition's new durable events once and broadcasts them; ends when nobody listens
/// or the topic is deleted.
async fn run_hub(
    broker: Arc<Broker>,
    topic: Arc<Topic>,
    id: u64,
    sender: broadcast::Sender<Arc<LiveEvent>>,
    mut next: Vec<u64>,
) {
    let mut watches: Vec<_> = topic.partitions.iter().map(|p| broker.watch(p)).collect();
    let mut check = tokio::time::interval(Duration::from_secs(1));
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        for (i, p) in topic.partitions.iter().enumerate() {
            while next[i] < p.high_watermark() {
                let (part, name, from) = (p.clone(), topic.name.clone(), next[i]);
                let read = move || read_events(&part, &name, i as u32, from, CATCH_UP_PAGE_EVENTS);
                let page = if p.high_watermark() - from <= LIVE_INLINE_EVENTS {
                    // The live tail was just written and synced: it is in the page cache, and
                    // reading it here saves a thread hand-off on every event's way out.
                    read()
                } else {
                    blocking(read).await
                };
                match page {
                    Ok(page) => {
                        for e in page.events {
                            let _ = sender.send(Arc::new(LiveEvent::new(
                                e.partition,
                                e.offset,
                                e.event,
                            )));
                        }
                        if page.next_offset == next[i] {
                            break;
                        }
                        next[i] = page.next_offset;
                    }
                    Err(BrokerError::Log(spate_log::Error::OffsetOutOfRange {
                        log_start_offset,
                        ..
                    })) if log_start_offset > next[i] => {
                        // Retention removed events nobody had read yet; subscribers that need them
                        // notice the gap and move on from the log start.
                        next[i] = log_start_offset;
                    }
                    Err(e) => {
                        tracing::warn!(topic = %topic.name, error = %e, "live feed read failed");
                        break;
                    }
                }
            }
        }
        let changed = select_all(watches.iter_mut().map(|w| Box::pin(w.changed())));
        tokio::select! {
            (r, _, _) = changed => {
                if r.is_err() {
                    broker.stop_hub_if_unused(&topic.name, id, true);
                    return;
                }
            }
            _ = check.tick() => {
                let deleted = !broker
                    .topic(&topic.name)
                    .is_ok_and(|t| Arc::ptr_eq(&t, &topic));
                if broker.stop_hub_if_unused(&topic.name, id, deleted) {
                    return;
                }
            }
        }
    }
}

impl Feed {
    /// Per partition, the offset after the last event handed out (the start position before any):
    /// where a resumed feed starts so that nothing is missed or repeated.
    pub fn position(&self) -> &[u64] {
        &self.position
    }

    /// The creation time of the topic this feed reads: what tells it from a topic deleted and
    /// created again under its name.
    pub fn topic_created_ms(&self) -> i64 {
        self.topic.created_ms
    }

    pub fn topic(&self) -> &str {
        &self.topic.name
    }

    /// The next event that passes the filter, waiting for one to become durable.
    pub async fn next(&mut self) -> Result<Arc<LiveEvent>, FeedError> {
        loop {
            if let Some((e, version)) = self.ready.pop_front() {
                self.position[e.partition as usize] = e.offset + 1;
                self.version = version;
                return Ok(e);
            }
            if let Some(i) = (0..self.cursor.len()).find(|&i| self.cursor[i] < self.target[i]) {
                if let Some(since) = self.behind_since
                    && since.elapsed() > self.max_behind
                {
                    return Err(FeedError::SlowConsumer(self.max_behind));
                }
                self.catch_up(i).await?;
                continue;
            }
            match self.rx.recv().await {
                Ok(e) => {
                    if let Some(e) = self.take_live(e) {
                        return Ok(e);
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => self.lagged(),
                Err(broadcast::error::RecvError::Closed) => {
                    return Err(FeedError::TopicDeleted(self.topic.name.clone()));
                }
            }
        }
    }

    /// The next event that passes the filter when one is at hand (read from the log already, or
    /// waiting on the live ring), without waiting: `None` where [`Feed::next`] would wait, read
    /// the log or end. For writing out in one go what has piled up.
    pub fn try_next(&mut self) -> Option<Arc<LiveEvent>> {
        loop {
            if let Some((e, version)) = self.ready.pop_front() {
                self.position[e.partition as usize] = e.offset + 1;
                self.version = version;
                return Some(e);
            }
            if self.cursor.iter().zip(&self.target).any(|(c, t)| c < t) {
                return None;
            }
            match self.rx.try_recv() {
                Ok(e) => {
                    if let Some(e) = self.take_live(e) {
                        return Some(e);
                    }
                }
                Err(broadcast::error::TryRecvError::Lagged(_)) => {
                    self.lagged();
                    return None;
                }
                Err(_) => return None,
            }
        }
    }

    /// An event from the live ring: handed out if it is the next of its partition and passes.
    fn take_live(&mut self, e: Arc<LiveEvent>) -> Option<Arc<LiveEvent>> {
        let i = e.partition as usize;
        if e.offset < self.cursor[i] {
            return None;
        }
        if e.offset > self.cursor[i] {
            // Events between the cursor and this one are in the log.
            self.target[i] = self.target[i].max(e.offset + 1);
            return None;
        }
        self.cursor[i] = e.offset + 1;
        self.behind_since = None;
        let version = self.admit(&e)?;
        self.position[i] = e.offset + 1;
        self.version = version;
        Some(e)
    }

    /// Fell more than the ring behind: the rest is read from the log.
    fn lagged(&mut self) {
        self.behind_since.get_or_insert_with(Instant::now);
        for (i, p) in self.topic.partitions.iter().enumerate() {
            self.target[i] = self.target[i].max(p.high_watermark());
        }
    }

    /// Whether the event is delivered (with its stream version in a stream feed). Called once
    /// per event, in offset order.
    fn admit(&mut self, e: &LiveEvent) -> Option<Option<u64>> {
        let version = match &mut self.stream {
            None => None,
            Some(scope) => {
                if e.event.partition_key() != Some(scope.key.as_str())
                    || e.event.event_type == crate::streams::STREAM_DELETED_TYPE
                {
                    // A stream's deletion takes no version; a feed of the stream leaves it out.
                    return None;
                }
                let v = scope.next_version;
                scope.next_version += 1;
                if v < scope.from_version {
                    return None;
                }
                Some(v)
            }
        };
        let pass =
            self.filter.is_empty() || self.filter.judge(&e.event, || e.input()) == Verdict::Match;
        pass.then_some(version)
    }

    /// The stream version of the event `next` returned last (stream feeds only).
    pub fn version(&self) -> Option<u64> {
        self.version
    }

    /// Narrows a topic feed to one stream: only partition `partition` from `offset`, only events
    /// keyed `key`, numbered from `version` (the version of the stream's event at or after
    /// `offset`), delivered from `from_version` on.
    pub fn scope_to_stream(
        &mut self,
        partition: u32,
        offset: u64,
        key: String,
        version: u64,
        from_version: u64,
    ) {
        for (i, (c, t)) in self.cursor.iter_mut().zip(&mut self.target).enumerate() {
            if i as u32 == partition {
                *c = offset;
                *t = (*t).max(offset);
            } else {
                *c = u64::MAX;
                *t = u64::MAX;
            }
        }
        self.position = self.cursor.clone();
        self.ready.clear();
        self.stream = Some(StreamScope {
            key,
            next_version: version,
            from_version,
        });
    }

    /// Reads one page of partition `i` from the log into `ready`.
    async fn catch_up(&mut self, i: usize) -> Result<(), FeedError> {
        let (p, name, from): (Arc<Partition>, String, u64) = (
            self.topic.partitions[i].clone(),
            self.topic.name.clone(),
            self.cursor[i],
        );
        // A whole page behind the end is read for all feeds (see `PageCache`).
        let page_size = CATCH_UP_PAGE_EVENTS as u64;
        let first = from - from % page_size;
        if p.high_watermark() >= first + page_size
            && first >= p.log_start_offset()
            && let Ok(page) = self.pages.page(&self.topic, i as u32, first).await
            && from < page.next_offset
        {
            let events = page.events.iter().filter(|e| e.offset >= from).cloned();
            self.queue(i, from, events, page.next_offset);
            return Ok(());
        }
        // Otherwise (near the end, past what the shared page holds, or its read failed) a page
        // of this feed's own, from its cursor.
        let page =
            blocking(move || read_events(&p, &name, i as u32, from, CATCH_UP_PAGE_EVENTS)).await;
        let page = match page {
            Ok(page) => page,
            Err(BrokerError::Log(spate_log::Error::OffsetOutOfRange {
                log_start_offset,
                high_watermark,
                ..
            })) => {
                // Retention removed what the cursor points at: go on from the log start, as a
                // Kafka consumer with `auto.offset.reset=earliest` would.
                if from < log_start_offset {
                    self.cursor[i] = log_start_offset;
                } else {
                    self.cursor[i] = high_watermark;
                    self.target[i] = high_watermark;
                }
                return Ok(());
            }
            Err(BrokerError::Log(spate_log::Error::UnknownTopic(_))) => {
                return Err(FeedError::TopicDeleted(self.topic.name.clone()));
            }
            Err(e) => return Err(e.into()),
        };
        if page.events.is_empty() && page.next_offset <= from {
            // Nothing there after all (the target was an estimate).
            self.target[i] = from;
            return Ok(());
        }
        let events = page
            .events
            .into_iter()
            .map(|e| Arc::new(LiveEvent::new(e.partition, e.offset, e.event)));
        self.queue(i, from, events, page.next_offset);
        Ok(())
    }

    /// Queues the events of a page of partition `i` read from `from` that pass, and moves the
    /// cursor past the page.
    fn queue(
        &mut self,
        i: usize,
        from: u64,
        events: impl Iterator<Item = Arc<LiveEvent>>,
        next_offset: u64,
    ) {
        for e in events {
            if let Some(version) = self.admit(&e) {
                self.ready.push_back((e, version));
            }
        }
        self.cursor[i] = next_offset.max(from);
    }
}

#[cfg(test)]
mod tests {
    use spate_log::mem::MemStorage;
    use spate_log::{Log, LogConfig, TopicConfig};

    use super::*;

    async fn broker_with(events: u64) -> Arc<Broker> {
        let log = Log::open(
            Arc::new(MemStorage::new()),
            std::path::Path::new("/d"),
            LogConfig::default(),
        )
        .unwrap();
        log.create_topic("t", TopicConfig::default(), 0).unwrap();
        let broker = Arc::new(Broker::new(Arc::new(log), Default::default()));
        for chunk in (0..events).collect::<Vec<_>>().chunks(100) {
            let batch = chunk
                .iter()
                .map(|n| Event {
                    event_type: if n % 3 == 0 { "three" } else { "other" }.into(),
                    id: Some(format!("e{n}")),
                    ..Event::default()
                })
                .collect();
            broker.publish("t", batch).await.unwrap();
        }
        broker
    }

    async fn drain(feed: &mut Feed, n: usize) -> Vec<Arc<LiveEvent>> {
        let mut out = Vec::new();
        while out.len() < n {
            let e = tokio::time::timeout(Duration::from_secs(10), feed.next())
                .await
                .expect("an event")
                .unwrap();
            out.push(e);
        }
        out
    }

    #[tokio::test]
    async fn feeds_catching_up_share_whole_pages_and_each_gets_exactly_its_events() {
        let broker = broker_with(1000).await;
        let all = Arc::new(Filter::new(None, None).unwrap());
        let open = |start: FeedStart, filter: Arc<Filter>| {
            let broker = broker.clone();
            async move {
                broker
                    .feed("t", start, filter, Duration::from_secs(60))
                    .await
                    .unwrap()
            }
        };
        let mut a = open(FeedStart::Earliest, all.clone()).await;
        let mut b = open(FeedStart::Earliest, all.clone()).await;
        // From the middle of a page.
        let mut c = open(FeedStart::Offsets(HashMap::from([(0, 300)])), all.clone()).await;
        let threes = Arc::new(Filter::new(None, Some("three")).unwrap());
        let mut d = open(FeedStart::Offsets(HashMap::from([(0, 301)])), threes).await;
        let from_a = drain(&mut a, 1000).await;
        let from_b = drain(&mut b, 1000).await;
        let from_c = drain(&mut c, 700).await;
        let from_d = drain(&mut d, 233).await;
        let offsets = |v: &[Arc<LiveEvent>]| v.iter().map(|e| e.offset).collect::<Vec<_>>();
        assert_eq!(offsets(&from_a), (0..1000).collect::<Vec<_>>());
        assert_eq!(offsets(&from_b), (0..1000).collect::<Vec<_>>());
        assert_eq!(offsets(&from_c), (300..1000).collect::<Vec<_>>());
        assert_eq!(
            offsets(&from_d),
            (301..1000).filter(|n| n % 3 == 0).collect::<Vec<_>>()
        );
        for (i, e) in from_a.iter().enumerate() {
            assert_eq!(e.event.id.as_deref(), Some(format!("e{i}").as_str()));
        }
        // The three whole pages (0, 256, 512) were read once and shared; the last one, which
        // ends at the log's end, by each feed for itself.
        for i in 0..768 {
            assert!(Arc::ptr_eq(&from_a[i], &from_b[i]), "offset {i}");
        }
        assert!(Arc::ptr_eq(&from_a[300], &from_c[0]));
        assert!(!Arc::ptr_eq(&from_a[800], &from_b[800]));
        let cached = broker.hubs.pages.inner.lock().unwrap();
        let mut firsts: Vec<u64> = cached.order.iter().map(|(k, _)| k.3).collect();
        firsts.sort();
        assert_eq!(firsts, [0, 256, 512]);
    }

    /// Offsets of at least `n` events: one waited for with `next`, then those at hand, in turns.
    async fn next_then_at_hand(feed: &mut Feed, n: usize) -> Vec<u64> {
        let mut out = Vec::new();
        while out.len() < n {
            let e = tokio::time::timeout(Duration::from_secs(10), feed.next())
                .await
                .unwrap()
                .unwrap();
            out.push(e.offset);
            while let Some(e) = feed.try_next() {
                out.push(e.offset);
            }
        }
        out
    }

    #[tokio::test]
    async fn events_at_hand_come_from_try_next_in_order_and_waiting_is_left_to_next() {
        let broker = broker_with(700).await;
        let all = Arc::new(Filter::new(None, None).unwrap());
        let mut feed = broker
            .feed("t", FeedStart::Earliest, all, Duration::from_secs(60))
            .await
            .unwrap();
        // Nothing read from the log yet: try_next does not read, it leaves that to next.
        assert!(feed.try_next().is_none());
        let got = next_then_at_hand(&mut feed, 700).await;
        assert_eq!(got, (0..700).collect::<Vec<_>>());
        assert_eq!(feed.position(), [700]);
        assert!(feed.try_next().is_none());
        // Live events: the first waited for, the rest (if already on the ring) at hand.
        for chunk in [0..5u64, 5..10] {
            let batch = chunk
                .map(|n| Event {
                    event_type: "live".into(),
                    id: Some(format!("l{n}")),
                    ..Event::default()
                })
                .collect();
            broker.publish("t", batch).await.unwrap();
        }
        let live = next_then_at_hand(&mut feed, 10).await;
        assert_eq!(live, (700..710).collect::<Vec<_>>());
        assert_eq!(feed.position(), [710]);
    }

    #[tokio::test]
    async fn the_shared_pages_stay_within_their_budget() {
        let broker = broker_with(0).await;
        let topic = broker.topic("t").unwrap();
        // Events of about 40 KiB: a page of 256 of them is accounted at about 27 MB, so three
        // pages pass the 64 MiB budget.
        let pad = "x".repeat(40_000);
        for _ in 0..12 {
            let batch = (0..64)
                .map(|_| Event {
                    event_type: "big".into(),
                    datacontenttype: Some("text/plain".into()),
                    data: Some(pad.clone().into_bytes()),
                    ..Event::default()
                })
                .collect();
            broker.publish("t", batch).await.unwrap();
        }
        for first in [0, 256, 512] {
            let page = broker.hubs.pages.page(&topic, 0, first).await.unwrap();
            assert!(!page.events.is_empty());
            let cached = broker.hubs.pages.inner.lock().unwrap();
            assert!(cached.bytes <= PAGE_CACHE_BYTES, "{}", cached.bytes);
            assert_eq!(cached.pages.len(), cached.order.len());
        }
        let cached = broker.hubs.pages.inner.lock().unwrap();
        assert!(cached.order.len() < 3, "{} pages kept", cached.order.len());
    }
}
