//! Subscription consumers on the WebSocket: `consume` streams a subscription's messages to the
//! connection with at most `max_in_flight` unsettled, `ack` and `nack` settle them.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use spate_broker::subscriptions::{SettleResult, Subscriptions};
use tokio::sync::{Notify, mpsc};

use crate::ApiError;
use crate::push::Out;
use crate::subscriptions::write_delivery;

/// Unsettled messages one consumer may hold, at most.
pub const MAX_IN_FLIGHT: usize = 1000;

/// A consumer's credit: the ack ids it holds unsettled.
pub(crate) struct Credit {
    pub subscription: String,
    max: usize,
    held: Mutex<HashSet<String>>,
    freed: Notify,
}

impl Credit {
    pub fn new(subscription: String, max: usize) -> Arc<Credit> {
        Arc::new(Credit {
            subscription,
            max,
            held: Mutex::new(HashSet::new()),
            freed: Notify::new(),
        })
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn holds(&self, ack_id: &str) -> bool {
        self.held().contains(ack_id)
    }

    /// Gives back the credit of a settled message.
    pub fn release(&self, ack_id: &str) {
        if self.held().remove(ack_id) {
            self.freed.notify_one();
        }
    }
}

fn send_error(tx: &mpsc::Sender<Out>, subscription: &str, e: ApiError) {
    let v =
        json!({"op": "error", "subscription": subscription, "code": e.kind, "message": e.detail});
    let _ = tx.try_send(Out::Text(v.to_string()));
}

/// Pulls messages for one consumer and queues them on the connection until it ends.
pub(crate) async fn run(subs: Arc<Subscriptions>, credit: Arc<Credit>, tx: mpsc::Sender<Out>) {
    let name = credit.subscription.clone();
    loop {
        let room = credit.max.saturating_sub(credit.held().len());
        if room == 0 {
            let freed = credit.freed.notified();
            if tokio::time::timeout(Duration::from_secs(1), freed)
                .await
                .is_err()
            {
                // Messages whose ack timeout ran out are no longer this consumer's to settle.
                let held: Vec<String> = credit.held().iter().cloned().collect();
                let live = subs.still_in_flight(&name, &held);
                let mut h = credit.held();
                for (id, live) in held.iter().zip(live) {
                    if !live {
                        h.remove(id);
                    }
                }
            }
            continue;
        }
        let pulled = subs.pull(&name, room, Duration::from_secs(5)).await;
        let messages = match pulled {
            Ok(m) => m,
            Err(e) => {
                send_error(&tx, &name, e.into());
                return;
            }
        };
        if messages.is_empty() {
            if tx.is_closed() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        }
        for d in messages {
            credit.held().insert(d.ack_id.clone());
            let mut text = String::with_capacity(1500);
            text.push('{');
            write_delivery(
                &mut text,
                &format!(
                    "\"op\":\"message\",\"subscription\":{},",
                    Value::from(name.as_str())
                ),
                &d,
            );
            text.push('}');
            if tx.send(Out::Text(text)).await.is_err() {
                return;
            }
        }
    }
}

/// The reply to a WebSocket ack or nack.
pub(crate) fn settled(op: &str, subscription: &str, ack_id: &str, result: SettleResult) -> Value {
    json!({"op": op, "subscription": subscription, "ack_id": ack_id, "result": result})
}
