//! An S3 server in this process: s3s-fs (an independent S3 implementation
//! that checks `x-amz-checksum-crc32`, `Content-MD5` and SigV4) on a
//! directory, on a loopback port. The main job delivers its demo recording
//! through it, and the end-to-end tests use it as the customer's bucket.
//! Objects are plain files under `<root>/<bucket>/<key>`.

use std::{io, net::SocketAddr, path::Path};

use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto::Builder,
};

/// A running server; dropping it stops the server and closes its connections.
#[derive(Debug)]
pub struct S3Server {
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// Serves `root` on `addr` (use port 0 for a free one) for the one key pair
/// `access_key`/`secret_key` (SigV4). `access`, when given, sees every
/// request (tests record them; it may refuse).
pub async fn serve<A: s3s::access::S3Access>(
    root: &Path,
    addr: SocketAddr,
    access_key: &str,
    secret_key: &str,
    access: Option<A>,
) -> io::Result<S3Server> {
    let fs = s3s_fs::FileSystem::new(root).map_err(|e| io::Error::other(format!("{e:?}")))?;
    let mut builder = s3s::service::S3ServiceBuilder::new(fs);
    builder.set_auth(s3s::auth::SimpleAuth::from_single(
        access_key.to_owned(),
        secret_key.to_owned(),
    ));
    if let Some(access) = access {
        builder.set_access(access);
    }
    let service = builder.build();
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let port = listener.local_addr()?.port();
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let http = Builder::new(TokioExecutor::new());
        // Dropped when the server stops: its open connections end with it,
        // so a stopped server is down for pooled clients too.
        let mut connections = tokio::task::JoinSet::new();
        loop {
            let socket = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((socket, _)) => socket,
                    Err(_) => continue,
                },
                _ = &mut stopped => break,
                Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            };
            let (http, service) = (http.clone(), service.clone());
            connections.spawn(async move {
                let _ = http.serve_connection(TokioIo::new(socket), service).await;
            });
        }
    });
    Ok(S3Server {
        endpoint: format!("http://127.0.0.1:{port}"),
        _stop: stop,
    })
}

/// The access check that lets every authenticated request through (s3s's
/// default when no check is set), for [`serve`] without a recorder.
#[derive(Debug, Clone, Copy)]
pub struct AuthenticatedOnly;

// `S3Access` is an `#[async_trait]` trait; this is the signature the macro
// generates, written out so no async-trait dependency is needed.
impl s3s::access::S3Access for AuthenticatedOnly {
    fn check<'life0, 'life1, 'life2, 'async_trait>(
        &'life0 self,
        cx: &'life1 mut s3s::access::S3AccessContext<'life2>,
    ) -> std::pin::Pin<Box<dyn Future<Output = s3s::S3Result<()>> + Send + 'async_trait>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        'life2: 'async_trait,
        Self: 'async_trait,
    {
        let authenticated = cx.credentials().is_some();
        Box::pin(async move {
            if authenticated {
                Ok(())
            } else {
                Err(s3s::s3_error!(AccessDenied))
            }
        })
    }
}
