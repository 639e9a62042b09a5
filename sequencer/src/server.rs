//! Serving DKSP on the sequencer's port: the shared connection loop
//! ([`protocol::handler`]) with the sequencer's dispatch. Requests are answered one at a time,
//! in order; `NEXT` may wait for the persist of a new window.

use std::io;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

use protocol::handler::{self, Cx, Flow, Handler};
use protocol::seq::Request;
use protocol::{Connection, ErrorCode, Response};

use crate::oracle::Oracle;

/// The sequencer's side of one connection.
struct Seq {
    oracle: Arc<Oracle>,
}

impl Handler for Seq {
    type Request = Request;

    async fn dispatch(&mut self, req: Request, cx: &mut Cx<'_>) -> io::Result<Flow> {
        let resp = match req {
            Request::Next { count } => match self.oracle.next(count.unwrap_or(1)).await {
                Ok(first) => Response::Ts { first, count },
                Err(e) => Response::err(ErrorCode::Unavailable, e.to_string()),
            },
            Request::Current => Response::Ts {
                first: self.oracle.current(),
                count: None,
            },
            Request::Ping => Response::Pong,
            Request::Status => {
                let (current, reserved, window) = self.oracle.stats();
                Response::status(&[
                    ("role", "sequencer".to_string()),
                    ("current", current.to_string()),
                    ("reserved", reserved.to_string()),
                    ("window", window.to_string()),
                ])
            }
            Request::Quit => {
                cx.reply(Response::ok());
                return Ok(Flow::Close);
            }
        };
        cx.reply(resp);
        Ok(Flow::Continue)
    }
}

/// Serves one connection until it closes, sends `QUIT`, or the server shuts down.
pub async fn handle(conn: Connection, oracle: Arc<Oracle>, shutdown: CancellationToken) {
    handler::run(conn, Seq { oracle }, shutdown).await
}
