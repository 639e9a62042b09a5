//! Serving DKSP on the sequencer's port: one handler per connection.

use std::sync::Arc;
use tokio_util::sync::CancellationToken;

use protocol::seq::Request;
use protocol::{Connection, ErrorCode, Frame, Response};

use crate::oracle::Oracle;

pub async fn handle(mut conn: Connection, oracle: Arc<Oracle>, shutdown: CancellationToken) {
    loop {
        let frame = tokio::select! {
            _ = shutdown.cancelled() => break,
            f = conn.read_frame() => f,
        };
        let line = match frame {
            Ok(Some(Frame::Line(line))) => line,
            Ok(Some(Frame::TooLong)) => {
                conn.write_response(&Response::too_large(conn.max_line()));
                continue;
            }
            Ok(None) => break,
            Err(e) => {
                // Also a timeout or the read budget: `shutdown` then says why.
                tracing::debug!("connection error: {e}");
                break;
            }
        };
        let req = match Request::parse(&line) {
            Ok(Some(req)) => req,
            Ok(None) => continue,
            Err(e) => {
                conn.write_response(&Response::Err(e));
                continue;
            }
        };
        let resp = match req {
            Request::Next { count } => match oracle.next(count.unwrap_or(1)).await {
                Ok(first) => Response::Ts { first, count },
                Err(e) => Response::err(ErrorCode::Unavailable, e.to_string()),
            },
            Request::Current => Response::Ts {
                first: oracle.current(),
                count: None,
            },
            Request::Ping => Response::Pong,
            Request::Status => {
                let (current, reserved, window) = oracle.stats();
                Response::status(&[
                    ("role", "sequencer".to_string()),
                    ("current", current.to_string()),
                    ("reserved", reserved.to_string()),
                    ("window", window.to_string()),
                ])
            }
            Request::Quit => {
                conn.write_response(&Response::ok());
                break;
            }
        };
        conn.write_response(&resp);
    }
    let _ = conn.shutdown().await;
}
