//! The daemon's side of the control socket: each connection is one request, read in the
//! versioned framing of `control`; a reconcile goes through the worker (one at a time), other
//! requests run on the store at once, their listings written to the socket as they are produced.

use super::{Daemon, Forced, cluster};
use crate::app::{self, EXIT_FAILED, Output, Request};
use crate::control;
use anyhow::Result;
use std::io::{BufRead, BufReader};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

pub(super) async fn control_server(
    daemon: Arc<Daemon>,
    listener: tokio::net::UnixListener,
    forced: mpsc::Sender<Forced>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let (daemon, forced) = (daemon.clone(), forced.clone());
        tokio::spawn(async move {
            let std_stream = match stream.into_std() {
                Ok(s) => s,
                Err(e) => return tracing::warn!(error = %e, "control connection failed"),
            };
            if let Err(e) = answer(daemon, std_stream, forced).await {
                tracing::warn!(error = %format!("{e:#}"), "control request failed");
            }
        });
    }
}

async fn answer(
    daemon: Arc<Daemon>,
    stream: std::os::unix::net::UnixStream,
    forced: mpsc::Sender<Forced>,
) -> Result<()> {
    stream.set_nonblocking(false)?;
    let reader_stream = stream.try_clone()?;
    let line = tokio::task::spawn_blocking(move || -> Result<String> {
        let mut line = String::new();
        BufReader::new(reader_stream).read_line(&mut line)?;
        Ok(line)
    })
    .await??;
    let request = match control::read_request(&line) {
        Ok(request) => request,
        Err(why) => {
            tracing::warn!(error = %why, "control request refused");
            return tokio::task::spawn_blocking(move || -> Result<()> {
                let mut stream = stream;
                std::io::Write::write_all(&mut stream, &control::refusal(why))?;
                Ok(())
            })
            .await?;
        }
    };
    // A reconcile goes through the worker (one at a time); its summary comes back whole.
    let output = match request {
        Request::Reconcile(args) => {
            let (tx, rx) = oneshot::channel();
            if forced.send((args, tx)).await.is_err() {
                Output::unusable("the daemon is shutting down")
            } else {
                rx.await.unwrap_or_else(|_| Output {
                    stderr: "error: the daemon stopped before the reconcile finished\n".into(),
                    code: EXIT_FAILED,
                    ..Output::default()
                })
            }
        }
        // In cluster mode a destination's outbox is served by its lease holder: it alone
        // re-queues and replays.
        request @ (Request::ReplayDeliveries { .. } | Request::RetryDeliveries { .. }) if daemon.node.is_some() => {
            let d = daemon.clone();
            let output = tokio::task::spawn_blocking(move || cluster::requeue(&d, &request))
                .await
                .unwrap_or_else(|e| Output::unusable(format!("the command panicked: {e}")));
            daemon.wake_delivery.notify_one();
            output
        }
        request => {
            // Listings are written to the socket as the command produces them.
            let d = daemon.clone();
            let socket = stream.try_clone()?;
            return tokio::task::spawn_blocking(move || -> Result<()> {
                let mut chunks = control::ChunkWriter::new(std::io::BufWriter::new(socket));
                let output = app::execute(&d.config(), &d.store, &request, &d.stop, &mut chunks);
                chunks.finish(&output)?;
                Ok(())
            })
            .await
            .unwrap_or_else(|e| Err(anyhow::anyhow!("control command panicked: {e}")));
        }
    };
    tokio::task::spawn_blocking(move || -> Result<()> {
        control::ChunkWriter::new(stream).finish(&output)?;
        Ok(())
    })
    .await??;
    Ok(())
}
