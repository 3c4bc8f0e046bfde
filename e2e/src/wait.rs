//! Waiting for a condition with a deadline: poll, and when time is up fail
//! with what was last observed. Tests and the harness wait this way, never
//! with a bare sleep.

use std::{
    future::Future,
    time::{Duration, Instant},
};

/// Interval between two polls.
pub const POLL: Duration = Duration::from_millis(250);

/// What a poll saw: done with a value, or not yet with a description.
pub enum Poll<T> {
    Ready(T),
    Pending(String),
}

/// Polls `check` until it is ready or `timeout` passed; on timeout returns the
/// description of the last pending poll.
pub async fn until<T, F, Fut>(timeout: Duration, mut check: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Poll<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match check().await {
            Poll::Ready(value) => return Ok(value),
            Poll::Pending(last) => {
                if Instant::now() >= deadline {
                    return Err(last);
                }
            }
        }
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn returns_the_value_once_ready() {
        let mut polls = 0;
        let got = until(Duration::from_secs(5), || {
            polls += 1;
            let n = polls;
            async move {
                if n >= 3 {
                    Poll::Ready(n)
                } else {
                    Poll::Pending(format!("poll {n}"))
                }
            }
        })
        .await;
        assert_eq!(got, Ok(3));
    }

    #[tokio::test]
    async fn times_out_with_the_last_observation() {
        let got: Result<(), String> = until(Duration::from_millis(300), || async {
            Poll::Pending("still starting".to_owned())
        })
        .await;
        assert_eq!(got, Err("still starting".to_owned()));
    }
}
