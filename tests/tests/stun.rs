//! The controller's STUN port (UDP, the gRPC listener's address): a standard client (coturn's
//! `turnutils_stunclient`) learns its address from it; garbage is not answered; a flood from
//! one source is cut to a burst. In-process controller, real UDP on loopback.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use canopy_proto::stun;
use canopy_tests::TestController;
use tokio::net::UdpSocket;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standard_stun_client_learns_its_address_from_the_controller() {
    let c = TestController::start().await;
    let port = c.server.local_addr.port().to_string();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("turnutils_stunclient")
            .args(["-p", &port, "-L", "127.0.0.1", "127.0.0.1"])
            .output()
            .expect("turnutils_stunclient (coturn, deploy/install-deps.sh)")
    })
    .await
    .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("UDP reflexive addr: 127.0.0.1:"),
        "turnutils_stunclient said: {text}"
    );
}

/// Sends `datagrams` from one socket and counts the answers that come back within 500 ms.
async fn answers(to: std::net::SocketAddr, datagrams: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for d in datagrams {
        sock.send_to(d, to).await.unwrap();
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 1500];
    while let Ok(Ok((n, _))) =
        tokio::time::timeout(Duration::from_millis(500), sock.recv_from(&mut buf)).await
    {
        got.push(buf[..n].to_vec());
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_gets_no_answer_and_a_flood_from_one_source_is_cut_to_a_burst() {
    let c = TestController::start().await;
    let to = c.server.local_addr;
    let mut wg_like = vec![1u8, 0, 0, 0];
    wg_like.resize(148, 7);
    let garbage = vec![b"hello".to_vec(), wg_like, vec![0; 600]];
    assert!(answers(to, &garbage).await.is_empty());
    let flood: Vec<Vec<u8>> = (0..200u8)
        .map(|i| stun::binding_request(&[i; 12]))
        .collect();
    let got = answers(to, &flood).await;
    assert!(
        !got.is_empty() && got.len() <= 41,
        "{} answers to 200 requests at once",
        got.len()
    );
    let (_, addr) = stun::parse_response(&got[0]).unwrap();
    assert_eq!(addr.ip(), to.ip(), "each answer names the sender");
}
