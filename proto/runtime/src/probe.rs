//! A plaintext port that serves only `grpc.health.v1.Health`, for
//! orchestrators whose probes cannot present a client certificate (the
//! kubelet's native gRPC probe). It reveals nothing but SERVING/NOT_SERVING;
//! every API stays behind mTLS on the main port.

use std::{future::Future, io, net::SocketAddr};

use tonic_health::pb::health_server::{Health, HealthServer};

/// Binds `addr` and serves the health service there until `shutdown`.
/// Returns the bound address.
pub async fn serve<T: Health>(
    addr: SocketAddr,
    health: HealthServer<T>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        if let Err(error) = tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await
        {
            tracing::error!(%error, "health probe port failed");
        }
    });
    Ok(local)
}

#[cfg(test)]
mod tests {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };

    #[tokio::test]
    async fn answers_health_checks_in_plaintext_and_nothing_else() {
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter
            .set_service_status(
                "recvault.vault.v1.Leases",
                tonic_health::ServingStatus::Serving,
            )
            .await;
        let addr = super::serve(
            "127.0.0.1:0".parse().expect("addr"),
            health,
            std::future::pending(),
        )
        .await
        .expect("bind");
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect");
        let reply = HealthClient::new(channel.clone())
            .check(HealthCheckRequest {
                service: "recvault.vault.v1.Leases".into(),
            })
            .await
            .expect("check");
        assert_eq!(reply.get_ref().status, ServingStatus::Serving as i32);
        // Only health is served here: an API call is UNIMPLEMENTED on this port.
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.expect("ready");
        let status = grpc
            .unary::<_, HealthCheckRequest, _>(
                tonic::Request::new(HealthCheckRequest::default()),
                "/recvault.vault.v1.Leases/AcquireLease"
                    .parse()
                    .expect("path"),
                tonic_prost::ProstCodec::default(),
            )
            .await
            .expect_err("no API on the probe port");
        assert_eq!(status.code(), tonic::Code::Unimplemented);
    }
}
