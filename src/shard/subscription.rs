//! A shard's pub/sub subscription: the loop that hands each message to the caller's
//! [`Subscription`], and tells it when messages may have been missed.

use std::sync::Weak;

use fred::clients::SubscriberClient;
use fred::prelude::*;
use tracing::debug;

use super::Subscription;

/// How long a reconnected subscription waits for the shard to confirm it.
const RESUBSCRIBE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Applies the messages of one shard's subscription until the shard's client is closed. It
/// never ends on a lag or a reconnect: both mean messages may have been missed, which is
/// reported to [`Subscription::lost`] before going on.
pub(super) async fn listen(
    subscriber: SubscriberClient,
    shard: String,
    mut messages: tokio::sync::broadcast::Receiver<fred::types::Message>,
    mut reconnects: tokio::sync::broadcast::Receiver<fred::types::config::Server>,
    to: Weak<dyn Subscription>,
) {
    use tokio::sync::broadcast::error::RecvError;
    let Some(channel) = to.upgrade().map(|s| s.channel()) else {
        return;
    };
    // Recorded even while the shard is down, and sent again on every reconnect.
    let _ = subscriber.subscribe(channel.clone()).await;
    let mut connected_before = false;
    loop {
        tokio::select! {
            message = messages.recv() => {
                let Some(to) = to.upgrade() else { return };
                match message {
                    Ok(message) => {
                        if let Some(text) = message.value.as_str() {
                            to.message(&text);
                        }
                    }
                    Err(RecvError::Lagged(n)) => {
                        debug!(shard = %shard, missed = n, "event subscription lagged");
                        to.lost(&shard, "lagged");
                    }
                    Err(RecvError::Closed) => return,
                }
            }
            reconnect = reconnects.recv() => match reconnect {
                // The first connection missed nothing: nothing was cached from events before it.
                Ok(_) if !connected_before => connected_before = true,
                // Several reconnects at once are still one loss.
                Ok(_) | Err(RecvError::Lagged(_)) => {
                    let Some(to) = to.upgrade() else { return };
                    to.lost(&shard, "reconnected");
                    // And once more when the subscription is back, so that nothing published
                    // between the reconnect and the resubscription slips through.
                    let resubscribed = tokio::time::timeout(
                        RESUBSCRIBE_WAIT,
                        subscriber.subscribe(channel.clone()),
                    )
                    .await;
                    if !matches!(resubscribed, Ok(Ok(()))) {
                        debug!(shard = %shard, "resubscribe not confirmed");
                    }
                    to.resubscribed();
                }
                Err(RecvError::Closed) => return,
            },
        }
    }
}
