//! List calls in rounds: concurrent callers with the same credentials share one request.
//!
//! Some providers list every webhook of an account in one answer (Smallest's `GET
//! /webhook`), and a subscription finds its own by URL there. With thousands of
//! subscriptions on one account, a list per pass would be quadratic: each answer holds
//! them all. Here callers that arrive while a list is in flight form the next round, which
//! is sent once the current one is answered; every member of a round arrived before its
//! request was sent, so each sees an answer at least as new as its own earlier writes.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use sha2::{Digest, Sha256};

use crate::model::ProviderError;

type Round<T> = Shared<BoxFuture<'static, Result<Arc<T>, ProviderError>>>;

struct KeyRounds<T> {
    /// The round callers join now: not sent yet.
    next: Option<Round<T>>,
    /// Held while a round's request is in flight.
    in_flight: Arc<tokio::sync::Mutex<()>>,
}

impl<T> Default for KeyRounds<T> {
    fn default() -> Self {
        KeyRounds {
            next: None,
            in_flight: Arc::default(),
        }
    }
}

/// Rounds per credential (kept by digest, not by value).
pub struct ListRounds<T> {
    keys: Arc<Mutex<HashMap<[u8; 32], KeyRounds<T>>>>,
}

impl<T> Default for ListRounds<T> {
    fn default() -> Self {
        ListRounds {
            keys: Arc::default(),
        }
    }
}

impl<T: Send + Sync + 'static> ListRounds<T> {
    /// The answer of the next round for `credential`; `fetch` sends the request if this
    /// caller opens the round.
    pub async fn join<F, Fut>(&self, credential: &str, fetch: F) -> Result<Arc<T>, ProviderError>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, ProviderError>> + Send + 'static,
    {
        let digest: [u8; 32] = Sha256::digest(credential.as_bytes()).into();
        let round = {
            let mut keys = self.keys.lock().expect("list rounds lock");
            let rounds = keys.entry(digest).or_default();
            match &rounds.next {
                Some(round) => round.clone(),
                None => {
                    let (in_flight, keys) = (rounds.in_flight.clone(), self.keys.clone());
                    let round = async move {
                        let _turn = in_flight.lock().await;
                        // Sent from here on: later callers form the round after this one.
                        if let Some(r) = keys.lock().expect("list rounds lock").get_mut(&digest) {
                            r.next = None;
                        }
                        fetch().await.map(Arc::new)
                    }
                    .boxed()
                    .shared();
                    rounds.next = Some(round.clone());
                    round
                }
            }
        };
        round.await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    use super::*;

    /// A list whose answer is its own sequence number, taking 100 ms.
    fn counted(sent: &Arc<AtomicU64>) -> impl Future<Output = Result<u64, ProviderError>> + use<> {
        let sent = sent.clone();
        async move {
            let n = sent.fetch_add(1, Ordering::SeqCst) + 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
            Ok(n)
        }
    }

    #[tokio::test]
    async fn callers_during_a_list_share_the_next_one_never_an_earlier_one() {
        let rounds = Arc::new(ListRounds::<u64>::default());
        let sent = Arc::new(AtomicU64::new(0));
        let first = {
            let (rounds, sent) = (rounds.clone(), sent.clone());
            tokio::spawn(async move { *rounds.join("key", move || counted(&sent)).await.unwrap() })
        };
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert_eq!(
            sent.load(Ordering::SeqCst),
            1,
            "the first round is in flight"
        );
        // 50 callers arrive while it is in flight: one more request serves them all, and
        // none of them is given the answer to a request sent before it arrived.
        let later: Vec<_> = (0..50)
            .map(|_| {
                let (rounds, sent) = (rounds.clone(), sent.clone());
                tokio::spawn(
                    async move { *rounds.join("key", move || counted(&sent)).await.unwrap() },
                )
            })
            .collect();
        assert_eq!(first.await.unwrap(), 1);
        for l in later {
            assert_eq!(l.await.unwrap(), 2);
        }
        assert_eq!(sent.load(Ordering::SeqCst), 2);
        // Another credential never shares a round.
        let other = rounds.join("other", {
            let sent = sent.clone();
            move || counted(&sent)
        });
        assert_eq!(*other.await.unwrap(), 3);
        // Nothing in flight: a caller opens a round of its own at once.
        assert_eq!(
            *rounds.join("key", move || counted(&sent)).await.unwrap(),
            4
        );
    }

    #[tokio::test]
    async fn a_failed_round_fails_its_members_and_the_next_round_is_tried_afresh() {
        let rounds = ListRounds::<u64>::default();
        let err = rounds
            .join("key", || async {
                Err(ProviderError::Unavailable("down".into()))
            })
            .await;
        assert!(matches!(err, Err(ProviderError::Unavailable(_))));
        assert_eq!(*rounds.join("key", || async { Ok(7) }).await.unwrap(), 7);
    }
}
