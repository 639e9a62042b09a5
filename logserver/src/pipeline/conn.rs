//! One connection of a [`super::Pipeline`]: a writer task that dials and writes frames in
//! order, and a reader task that hands every reply frame to the pipeline's actor. Neither
//! blocks the actor: a follower that stops reading stalls only the writer, and the actor's
//! deadline for the oldest request gives up on it.

use futures::{SinkExt, StreamExt};
use std::io;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::Fault;
use crate::network::NetConfig;

/// One connection's writer and reader tasks; dropping it ends both.
pub(super) struct ConnTasks {
    pub(super) id: u64,
    pub(super) frames: mpsc::UnboundedSender<bytes::Bytes>,
    writer: JoinHandle<()>,
    pub(super) reader: Option<JoinHandle<()>>,
}

impl Drop for ConnTasks {
    fn drop(&mut self) {
        self.writer.abort();
        if let Some(r) = &self.reader {
            r.abort();
        }
    }
}

/// What the connection tasks report.
pub(super) enum ConnEvent {
    /// The reader task, once the writer has connected: what to abort with the connection.
    Reader(u64, JoinHandle<()>),
    Reply(u64, bytes::BytesMut),
    Failed(u64, Fault),
}

/// Starts a connection's writer task: it dials, starts the reader, then writes frames in order.
pub(super) fn connect(
    id: u64,
    addr: String,
    net: NetConfig,
    events: &mpsc::UnboundedSender<ConnEvent>,
) -> ConnTasks {
    let (frames, mut rx) = mpsc::unbounded_channel::<bytes::Bytes>();
    let events = events.clone();
    let writer = tokio::spawn(async move {
        let conn = match crate::network::dial(&addr, &net).await {
            Ok(c) => c,
            Err(e) => {
                let _ = events.send(ConnEvent::Failed(
                    id,
                    Fault::Unreachable(format!("{addr}: {e}")),
                ));
                return;
            }
        };
        let (mut sink, mut stream) = conn.split();
        let reader_events = events.clone();
        let reader = tokio::spawn(async move {
            loop {
                let ev = match stream.next().await {
                    Some(Ok(frame)) => ConnEvent::Reply(id, frame),
                    Some(Err(e)) => ConnEvent::Failed(id, Fault::Network(e.to_string())),
                    None => ConnEvent::Failed(
                        id,
                        Fault::Network(
                            io::Error::new(io::ErrorKind::UnexpectedEof, "peer closed").to_string(),
                        ),
                    ),
                };
                let end = matches!(ev, ConnEvent::Failed(..));
                if reader_events.send(ev).is_err() || end {
                    return;
                }
            }
        });
        let _ = events.send(ConnEvent::Reader(id, reader));
        while let Some(frame) = rx.recv().await {
            // Several frames queued: write them with one flush.
            let mut batch = vec![frame];
            while let Ok(f) = rx.try_recv() {
                batch.push(f);
            }
            let mut result = Ok(());
            for f in batch {
                result = sink.feed(f).await;
                if result.is_err() {
                    break;
                }
            }
            if result.is_ok() {
                result = sink.flush().await;
            }
            if let Err(e) = result {
                let _ = events.send(ConnEvent::Failed(id, Fault::Network(e.to_string())));
                return;
            }
        }
    });
    ConnTasks {
        id,
        frames,
        writer,
        reader: None,
    }
}
