//! The Kafka change log: one topic per run, one partition per change-log partition.
//! Capture produces with an idempotent `acks=all` producer and waits for every ack before
//! it confirms the slot; replay reads assigned partitions from offsets stored in the
//! target (no consumer-group rebalancing involved). A message's position in our terms
//! is its offset + 1, so "position p" means "everything before offset p is applied".

use prost::bytes::Bytes;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};
use schemashift_common::change::Change;
use schemashift_common::ids::ChangeSeq;
use schemashift_common::kafka_conn::KafkaConn;
use schemashift_common::retry::{Class, Classify};
use std::collections::BTreeMap;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum KafkaLogError {
    /// Brokers unreachable or slow: retry with backoff, the slot keeps the WAL meanwhile.
    #[error("kafka topic {topic}: {reason}")]
    Unavailable { topic: String, reason: String },
    /// A message that is not one of ours: retrying cannot help.
    #[error("kafka topic {topic}, partition {partition}, offset {offset}: {reason}")]
    Corrupt {
        topic: String,
        partition: u32,
        offset: i64,
        reason: String,
    },
}

impl Classify for KafkaLogError {
    fn class(&self) -> Class {
        match self {
            KafkaLogError::Unavailable { .. } => Class::Transient,
            KafkaLogError::Corrupt { .. } => Class::Permanent,
        }
    }
}

fn config(kafka: &KafkaConn) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", kafka.brokers.join(","))
        .set("socket.timeout.ms", "10000")
        .set("log_level", "3");
    for (k, v) in kafka.security.properties() {
        c.set(k, v.expose());
    }
    c
}

fn unavailable(topic: &str, e: &KafkaError) -> KafkaLogError {
    KafkaLogError::Unavailable {
        topic: topic.to_owned(),
        reason: e.to_string(),
    }
}

/// Creates the run's topic if it does not exist yet.
pub async fn ensure_topic(
    brokers: &KafkaConn,
    topic: &str,
    partitions: u32,
    replication_factor: i32,
) -> Result<(), KafkaLogError> {
    let admin: AdminClient<DefaultClientContext> = config(brokers)
        .create()
        .map_err(|e| unavailable(topic, &e))?;
    let new = NewTopic::new(
        topic,
        partitions as i32,
        TopicReplication::Fixed(replication_factor),
    );
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = admin
        .create_topics([&new], &opts)
        .await
        .map_err(|e| unavailable(topic, &e))?;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => {
                return Err(KafkaLogError::Unavailable {
                    topic: topic.to_owned(),
                    reason: format!("creating the topic: {code}"),
                })
            }
        }
    }
    Ok(())
}

/// Checks that the brokers answer (for the planner: bad input before any write).
pub async fn check_brokers(kafka: &KafkaConn) -> Result<(), String> {
    let problems = kafka.security.check_local();
    if !problems.is_empty() {
        return Err(problems.join("; "));
    }
    let brokers = kafka.clone();
    tokio::task::spawn_blocking(move || {
        let c: BaseConsumer = config(&brokers)
            .set("group.id", "schemashift-check")
            .create()
            .map_err(|e| e.to_string())?;
        c.fetch_metadata(None, Duration::from_secs(5))
            .map(|_| ())
            .map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())?
}

/// One message to produce: partition, key, value, trace context.
pub struct Outgoing {
    pub partition: u32,
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub traceparent: Option<String>,
}

pub struct ChangeProducer {
    producer: FutureProducer,
    topic: String,
}

impl ChangeProducer {
    pub fn new(brokers: &KafkaConn, topic: &str) -> Result<Self, KafkaLogError> {
        let producer = config(brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("compression.type", "lz4")
            .set("message.timeout.ms", "30000")
            .create()
            .map_err(|e| unavailable(topic, &e))?;
        Ok(ChangeProducer {
            producer,
            topic: topic.to_owned(),
        })
    }

    /// Produces every message and returns once all are acknowledged by the brokers, with
    /// where each partition written to now ends (the last acknowledged offset + 1).
    /// On error some may be in Kafka: the caller re-sends them later (duplicates are
    /// recognised by replay).
    pub async fn send_all(&self, batch: &[Outgoing]) -> Result<BTreeMap<u32, i64>, KafkaLogError> {
        let mut heads = BTreeMap::new();
        let mut pending = Vec::with_capacity(batch.len());
        for m in batch {
            let mut headers = OwnedHeaders::new();
            if let Some(tp) = &m.traceparent {
                headers = headers.insert(Header {
                    key: "traceparent",
                    value: Some(tp.as_str()),
                });
            }
            let mut record = FutureRecord::to(&self.topic)
                .partition(m.partition as i32)
                .key(&m.key)
                .payload(&m.value)
                .headers(headers);
            loop {
                match self.producer.send_result(record) {
                    Ok(f) => {
                        pending.push(f);
                        break;
                    }
                    // The local queue is full: let what is in flight drain, then retry.
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                        record = r;
                        for f in pending.drain(..) {
                            wait_ack(&self.topic, f, &mut heads).await?;
                        }
                    }
                    Err((e, _)) => return Err(unavailable(&self.topic, &e)),
                }
            }
        }
        for f in pending {
            wait_ack(&self.topic, f, &mut heads).await?;
        }
        Ok(heads)
    }
}

async fn wait_ack(
    topic: &str,
    f: rdkafka::producer::DeliveryFuture,
    heads: &mut BTreeMap<u32, i64>,
) -> Result<(), KafkaLogError> {
    match f.await {
        Ok(Ok(d)) => {
            let head = heads.entry(d.partition as u32).or_insert(0);
            *head = (*head).max(d.offset + 1);
            Ok(())
        }
        Ok(Err((e, _))) => Err(unavailable(topic, &e)),
        Err(_) => Err(KafkaLogError::Unavailable {
            topic: topic.to_owned(),
            reason: "producer closed before the ack".into(),
        }),
    }
}

/// Reads one partition from a position; the caller stores the position it applied.
pub struct PartitionReader {
    consumer: StreamConsumer,
    topic: String,
    partition: u32,
}

impl PartitionReader {
    pub fn open(
        brokers: &KafkaConn,
        topic: &str,
        partition: u32,
        position: i64,
        group: &str,
    ) -> Result<Self, KafkaLogError> {
        let consumer: StreamConsumer = config(brokers)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("fetch.wait.max.ms", "10")
            // librdkafka prefetches up to 100,000 messages or 64 MB per partition by
            // default; a worker's memory should not grow with the log's backlog. One fetch
            // is in flight per broker, so a fetch's size over the broker's round trip bounds
            // replay: 256 KB held it at about 22K changes/s against tansu; 2 MB does not.
            .set("queued.min.messages", "20000")
            .set("queued.max.messages.kbytes", "8192")
            .set("fetch.max.bytes", "4194304")
            .set("max.partition.fetch.bytes", "2097152")
            .create()
            .map_err(|e| unavailable(topic, &e))?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition as i32, Offset::Offset(position))
            .map_err(|e| unavailable(topic, &e))?;
        consumer.assign(&tpl).map_err(|e| unavailable(topic, &e))?;
        Ok(PartitionReader {
            consumer,
            topic: topic.to_owned(),
            partition,
        })
    }

    /// Up to `max` changes, waiting at most `wait` for the first; each with its position
    /// (offset + 1).
    pub async fn read(
        &mut self,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<(ChangeSeq, Change)>, KafkaLogError> {
        let mut out = Vec::new();
        let mut limit = wait;
        while out.len() < max {
            let msg = match tokio::time::timeout(limit, self.consumer.recv()).await {
                Err(_) => break,
                Ok(Err(e)) => return Err(unavailable(&self.topic, &e)),
                Ok(Ok(m)) => m,
            };
            let offset = msg.offset();
            let payload = Bytes::copy_from_slice(msg.payload().unwrap_or_default());
            let change =
                schemashift_proto::decode_change(&payload).map_err(|e| KafkaLogError::Corrupt {
                    topic: self.topic.clone(),
                    partition: self.partition,
                    offset,
                    reason: e.to_string(),
                })?;
            out.push((ChangeSeq(offset + 1), change));
            // After the first message, take only what is already fetched.
            limit = Duration::from_millis(1);
        }
        Ok(out)
    }
}

/// The changes between two positions of each partition (from, to], for re-checks.
pub async fn read_between(
    brokers: &KafkaConn,
    topic: &str,
    from: &BTreeMap<u32, i64>,
    to: &BTreeMap<u32, i64>,
) -> Result<Vec<Change>, KafkaLogError> {
    let mut out = Vec::new();
    for (&p, &end) in to {
        let start = from.get(&p).copied().unwrap_or(0);
        if end <= start {
            continue;
        }
        let mut r = PartitionReader::open(brokers, topic, p, start, "schemashift-recheck")?;
        let mut pos = start;
        while pos < end {
            let batch = r
                .read((end - pos) as usize, Duration::from_secs(10))
                .await?;
            if batch.is_empty() {
                return Err(KafkaLogError::Unavailable {
                    topic: topic.to_owned(),
                    reason: format!("partition {p}: nothing readable at position {pos} of {end}"),
                });
            }
            for (seq, c) in batch {
                pos = seq.0;
                if seq.0 <= end {
                    out.push(c);
                }
            }
        }
    }
    Ok(out)
}
