//! The log as a whole: a data directory of topics, each a set of partitions.
//!
//! Layout: `<data>/topics/<name>/topic.json` and `<data>/topics/<name>/<partition>/` segments.
//! A topic is built complete in `<data>/staging/` and renamed into `topics/` in one step, so a crash
//! never leaves half a topic; a deleted topic is first renamed into `<data>/trash/` (from where it is
//! removed), so a crash never leaves half of one either.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use serde::{Deserialize, Serialize};

use crate::config::{LogConfig, TopicConfig, validate_topic_name};
use crate::error::{Error, IoContext, Result};
use crate::io::{Storage, parent, read_all, write_atomically};
use crate::partition::Partition;

/// A topic: its name, configuration and partitions.
pub struct Topic {
    pub name: String,
    /// Changed in place by [`Log::alter_topic_config`], so every holder of the topic sees it.
    config: RwLock<TopicConfig>,
    pub created_ms: i64,
    pub partitions: Vec<Arc<Partition>>,
}

impl Topic {
    pub fn new(
        name: String,
        config: TopicConfig,
        created_ms: i64,
        partitions: Vec<Arc<Partition>>,
    ) -> Topic {
        Topic {
            name,
            config: RwLock::new(config),
            created_ms,
            partitions,
        }
    }

    /// The topic's configuration as it is now.
    pub fn config(&self) -> TopicConfig {
        *self.config.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn partition(&self, id: u32) -> Result<&Arc<Partition>> {
        self.partitions
            .get(id as usize)
            .ok_or_else(|| Error::UnknownPartition {
                topic: self.name.clone(),
                partition: id,
            })
    }
}

#[derive(Serialize, Deserialize)]
struct TopicFile {
    name: String,
    created_ms: i64,
    config: TopicConfig,
}

/// The log of a data directory.
pub struct Log {
    dir: PathBuf,
    storage: Arc<dyn Storage>,
    config: LogConfig,
    topics: RwLock<BTreeMap<String, Arc<Topic>>>,
    /// Names of topics being created.
    pending: Mutex<BTreeSet<String>>,
    /// Held while a topic's configuration is changed or the topic deleted, so that a change
    /// reads and writes the configuration it replaces and never writes into a topic being removed.
    altering: Mutex<()>,
    /// Makes staging and trash names unique within a process.
    sequence: AtomicU64,
    /// The latest creation time given to a topic: each topic created gets a later one, so that
    /// a topic deleted and created again under its name tells the two apart (what is derived
    /// from a topic records the creation time of the topic it read).
    last_created_ms: AtomicI64,
}

/// Creates a directory and its missing ancestors, syncing each parent that gained an entry.
fn create_dir_all(storage: &dyn Storage, dir: &Path) -> Result<()> {
    if dir.parent().is_none() || storage.exists(dir).ctx("check", dir)? {
        return Ok(());
    }
    create_dir_all(storage, parent(dir))?;
    storage.create_dir(dir).ctx("create directory", dir)?;
    storage
        .sync_dir(parent(dir))
        .ctx("sync directory", parent(dir))
}

impl Log {
    /// Opens (or creates) the log in `dir`, recovering every partition.
    pub fn open(storage: Arc<dyn Storage>, dir: &Path, config: LogConfig) -> Result<Log> {
        for sub in ["topics", "staging", "trash"] {
            create_dir_all(&*storage, &dir.join(sub))?;
        }
        // Leftovers of interrupted creations and deletions.
        for sub in ["staging", "trash"] {
            let d = dir.join(sub);
            for name in storage.read_dir(&d).ctx("list", &d)? {
                let p = d.join(name);
                storage.remove_dir_all(&p).ctx("remove", &p)?;
            }
            storage.sync_dir(&d).ctx("sync directory", &d)?;
        }
        let mut topics = BTreeMap::new();
        let topics_dir = dir.join("topics");
        for name in storage.read_dir(&topics_dir).ctx("list", &topics_dir)? {
            let topic = Self::open_topic(&storage, &topics_dir.join(&name), &config)?;
            if topic.name != name {
                return Err(Error::Metadata {
                    path: topics_dir.join(&name),
                    reason: format!("directory holds topic {:?}", topic.name),
                });
            }
            topics.insert(name, Arc::new(topic));
        }
        let last_created_ms = topics.values().map(|t| t.created_ms).max().unwrap_or(0);
        Ok(Log {
            dir: dir.to_path_buf(),
            storage,
            config,
            topics: RwLock::new(topics),
            pending: Mutex::new(BTreeSet::new()),
            altering: Mutex::new(()),
            sequence: AtomicU64::new(0),
            last_created_ms: AtomicI64::new(last_created_ms),
        })
    }

    fn open_topic(storage: &Arc<dyn Storage>, dir: &Path, config: &LogConfig) -> Result<Topic> {
        let path = dir.join("topic.json");
        let bytes = read_all(&**storage, &path).ctx("read topic metadata", &path)?;
        let file: TopicFile = serde_json::from_slice(&bytes).map_err(|e| Error::Metadata {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        file.config.validate().map_err(|e| Error::Metadata {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let mut partitions = Vec::with_capacity(file.config.partitions as usize);
        for id in 0..file.config.partitions {
            let pdir = dir.join(id.to_string());
            partitions.push(Arc::new(Partition::open(
                storage.clone(),
                &pdir,
                &file.name,
                id,
                config.clone(),
            )?));
        }
        Ok(Topic::new(
            file.name,
            file.config,
            file.created_ms,
            partitions,
        ))
    }

    /// The directory the log lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn config(&self) -> &LogConfig {
        &self.config
    }

    fn unique(&self, name: &str) -> String {
        format!("{name}.{}", self.sequence.fetch_add(1, Ordering::Relaxed))
    }

    /// Creates a topic; fails with `TopicExists` when the name is taken.
    pub fn create_topic(&self, name: &str, config: TopicConfig, now_ms: i64) -> Result<Arc<Topic>> {
        validate_topic_name(name)?;
        config.validate()?;
        // Reserve the name, then build the topic without holding the lock: creating many
        // partitions takes many fsyncs, and lookups of other topics must not wait for them.
        {
            let topics = self.topics.read().unwrap_or_else(|e| e.into_inner());
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            if topics.contains_key(name) || !pending.insert(name.to_string()) {
                return Err(Error::TopicExists(name.to_string()));
            }
        }
        let created_ms = self
            .last_created_ms
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |last| {
                Some(now_ms.max(last.saturating_add(1)))
            })
            .map_or(now_ms, |last| now_ms.max(last.saturating_add(1)));
        let built = self.build_topic(name, &config, created_ms);
        let mut topics = self.topics.write().unwrap_or_else(|e| e.into_inner());
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        let topic = built?;
        topics.insert(name.to_string(), topic.clone());
        Ok(topic)
    }

    /// Builds a topic in `staging/` and moves it into `topics/` in one rename.
    fn build_topic(&self, name: &str, config: &TopicConfig, now_ms: i64) -> Result<Arc<Topic>> {
        let staging = self.dir.join("staging").join(self.unique(name));
        self.storage
            .create_dir(&staging)
            .ctx("create topic directory", &staging)?;
        let staged = (|| {
            for id in 0..config.partitions {
                let pdir = staging.join(id.to_string());
                Partition::create(self.storage.clone(), &pdir, name, id, self.config.clone())?;
            }
            let file = TopicFile {
                name: name.to_string(),
                created_ms: now_ms,
                config: *config,
            };
            let json = serde_json::to_vec_pretty(&file).expect("topic metadata serializes");
            let meta = staging.join("topic.json");
            write_atomically(&*self.storage, &meta, &json).ctx("write topic metadata", &meta)
        })();
        if let Err(e) = staged {
            // Best effort: staging is emptied on the next start anyway.
            let _ = self.storage.remove_dir_all(&staging);
            return Err(e);
        }
        let target = self.dir.join("topics").join(name);
        self.storage
            .rename(&staging, &target)
            .ctx("move topic into place", &target)?;
        let topics_dir = self.dir.join("topics");
        self.storage
            .sync_dir(&topics_dir)
            .ctx("sync directory", &topics_dir)?;
        // Open from the final place so every path points there.
        Ok(Arc::new(Self::open_topic(
            &self.storage,
            &target,
            &self.config,
        )?))
    }

    /// Changes a topic's configuration to what `change` makes of the current one; the partition
    /// count stays as it is. The new configuration is durable in the topic's metadata before it
    /// takes effect; it applies to appends and retention from then on (segments already sealed
    /// keep their size). With `validate_only` nothing is changed. Returns the new configuration.
    pub fn alter_topic_config(
        &self,
        name: &str,
        change: impl FnOnce(&TopicConfig) -> Result<TopicConfig>,
        validate_only: bool,
    ) -> Result<TopicConfig> {
        let _altering = self.altering.lock().unwrap_or_else(|e| e.into_inner());
        let topic = self.topic(name)?;
        let current = topic.config();
        let config = change(&current)?;
        if config.partitions != current.partitions {
            return Err(Error::InvalidConfig(format!(
                "the partition count of a topic cannot change here (topic {name} has {})",
                current.partitions
            )));
        }
        config.validate()?;
        if validate_only || config == current {
            return Ok(config);
        }
        let file = TopicFile {
            name: name.to_string(),
            created_ms: topic.created_ms,
            config,
        };
        let json = serde_json::to_vec_pretty(&file).expect("topic metadata serializes");
        let meta = self.dir.join("topics").join(name).join("topic.json");
        write_atomically(&*self.storage, &meta, &json).ctx("write topic metadata", &meta)?;
        *topic.config.write().unwrap_or_else(|e| e.into_inner()) = config;
        Ok(config)
    }

    /// Deletes a topic and all its data.
    pub fn delete_topic(&self, name: &str) -> Result<()> {
        let _altering = self.altering.lock().unwrap_or_else(|e| e.into_inner());
        let mut topics = self.topics.write().unwrap_or_else(|e| e.into_inner());
        let topic = topics
            .get(name)
            .cloned()
            .ok_or_else(|| Error::UnknownTopic(name.to_string()))?;
        for p in &topic.partitions {
            p.close();
        }
        let from = self.dir.join("topics").join(name);
        let trash = self.dir.join("trash").join(self.unique(name));
        self.storage
            .rename(&from, &trash)
            .ctx("move topic to trash", &from)?;
        let topics_dir = self.dir.join("topics");
        self.storage
            .sync_dir(&topics_dir)
            .ctx("sync directory", &topics_dir)?;
        topics.remove(name);
        drop(topics);
        self.storage
            .remove_dir_all(&trash)
            .ctx("remove deleted topic", &trash)?;
        Ok(())
    }

    pub fn topic(&self, name: &str) -> Result<Arc<Topic>> {
        self.topics
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
            .ok_or_else(|| Error::UnknownTopic(name.to_string()))
    }

    /// All topics, by name.
    pub fn topics(&self) -> Vec<Arc<Topic>> {
        self.topics
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Makes everything written durable (interval flushes, shutdown).
    pub fn flush(&self) -> Result<()> {
        let partitions: Vec<_> = self
            .topics()
            .iter()
            .flat_map(|t| t.partitions.iter().filter(|p| !p.is_poisoned()).cloned())
            .collect();
        crate::partition::sync_together(&partitions)
    }

    /// Applies every topic's retention. Returns the number of segments deleted.
    pub fn apply_retention(&self, now_ms: i64) -> Result<usize> {
        let mut n = 0;
        for topic in self.topics() {
            for p in &topic.partitions {
                n += p.apply_retention(now_ms, &topic.config())?;
            }
        }
        Ok(n)
    }
}
