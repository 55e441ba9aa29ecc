//! The engine's timers under a simulated clock: boringtun's `mock-instant` feature replaces
//! the clock inside each session (thread-local, so every test has its own, starting at zero),
//! and the engine gets the same time through `now`. No test sleeps: minutes pass in
//! microseconds.

use std::time::Duration;

use canopy_engine::testing::{Pair, ipv4, key, pubkey};
use canopy_engine::{HANDSHAKE_RATE_LIMIT, Outbox, TIMER_INTERVAL};
use mock_instant::MockClock;

const INIT: u8 = 1;
const DATA: u8 = 4;
/// A data message with an empty payload: a keepalive.
const KEEPALIVE_LEN: usize = 32;

/// Moves both clocks: boringtun's and the one the engines are driven with.
fn advance(p: &mut Pair, by: Duration) {
    MockClock::advance(by);
    p.advance(by);
}

/// Lets `total` pass in timer-interval steps, running both engines' timers at each; returns
/// what A and B sent, with the time since the start at which each went out.
#[allow(clippy::type_complexity)]
fn run_for(p: &mut Pair, total: Duration) -> (Vec<(Duration, Vec<u8>)>, Vec<(Duration, Vec<u8>)>) {
    let (mut from_a, mut from_b) = (Vec::new(), Vec::new());
    let mut t = Duration::ZERO;
    while t < total {
        advance(p, TIMER_INTERVAL);
        t += TIMER_INTERVAL;
        let (a, b) = p.timers();
        from_a.extend(a.into_iter().map(|d| (t, d)));
        from_b.extend(b.into_iter().map(|d| (t, d)));
    }
    (from_a, from_b)
}

fn initiations(sent: &[(Duration, Vec<u8>)]) -> Vec<Duration> {
    sent.iter()
        .filter(|(_, d)| d[0] == INIT)
        .map(|(t, _)| *t)
        .collect()
}

fn keepalives(sent: &[(Duration, Vec<u8>)]) -> Vec<Duration> {
    sent.iter()
        .filter(|(_, d)| d[0] == DATA && d.len() == KEEPALIVE_LEN)
        .map(|(t, _)| *t)
        .collect()
}

#[test]
fn poll_timeout_is_one_interval_after_each_run_and_early_calls_do_nothing() {
    let mut p = Pair::new(&["10.0.0.2/32"]);
    assert_eq!(p.a.poll_timeout(), None, "no time given yet");
    let mut out = Outbox::default();
    p.a.handle_timeout(p.now, &mut out);
    assert_eq!(p.a.poll_timeout(), Some(p.now + TIMER_INTERVAL));
    // A lost initiation is due for a retry, but a call before the deadline runs nothing.
    let _lost = p.send_a(&[ipv4("10.0.0.1", "10.0.0.2", b"x")]);
    advance(&mut p, Duration::from_secs(6));
    let early = p.now - p.a.poll_timeout().unwrap() > Duration::ZERO;
    assert!(early, "the deadline has passed");
    p.a.handle_timeout(p.now, &mut out);
    assert_eq!(out.net_packets().filter(|(_, d)| d[0] == INIT).count(), 1);
    out.clear();
    p.a.handle_timeout(p.now + TIMER_INTERVAL / 2, &mut out);
    assert_eq!(
        out.net_packets().count(),
        0,
        "before the next deadline: nothing runs"
    );
    // No peers: nothing to time.
    p.a.remove_peer(&pubkey(key(2)));
    assert_eq!(p.a.poll_timeout(), None);
}

#[test]
fn a_lost_initiation_is_retried_every_rekey_timeout_and_given_up_after_90_seconds() {
    let mut p = Pair::new(&["10.0.0.2/32"]);
    let first = p.send_a(&[ipv4("10.0.0.1", "10.0.0.2", b"x")]);
    assert_eq!(first.len(), 1, "the packet starts a handshake");
    // Nothing reaches B. A retries every 5 s (REKEY_TIMEOUT) and stops at 90 s
    // (REKEY_ATTEMPT_TIME).
    let (from_a, _) = run_for(&mut p, Duration::from_secs(120));
    let retries = initiations(&from_a);
    assert_eq!(
        retries.first(),
        Some(&Duration::from_secs(5)),
        "{retries:?}"
    );
    assert!(
        retries
            .windows(2)
            .all(|w| w[1] - w[0] == Duration::from_secs(5)),
        "{retries:?}"
    );
    assert!(
        retries.last().is_some_and(|t| *t < Duration::from_secs(90)),
        "no retry after REKEY_ATTEMPT_TIME: {retries:?}"
    );
    assert_eq!(retries.len(), 17, "{retries:?}");
    // Counted for `status` and the metrics: the first and 17 retries sent, one attempt given up.
    let st = p.a.peers().remove(0);
    assert_eq!((st.handshake_attempts, st.handshake_failures), (18, 1));
}

#[test]
fn a_persistent_keepalive_goes_out_every_interval_while_idle() {
    let mut p = Pair::new(&["10.0.0.2/32"]);
    let mut cfg = p.a.peer(&pubkey(key(2))).unwrap().config;
    cfg.persistent_keepalive = Some(25);
    p.a.set_peer(cfg);
    assert_eq!(p.connect().len(), 1);
    let (from_a, _) = run_for(&mut p, Duration::from_secs(80));
    let sent = keepalives(&from_a);
    let expected: Vec<Duration> = [25, 50, 75].map(Duration::from_secs).to_vec();
    assert_eq!(sent, expected);
}

#[test]
fn a_peer_that_only_receives_answers_with_a_keepalive_after_ten_seconds() {
    let mut p = Pair::new(&["10.0.0.2/32"]);
    assert_eq!(p.connect().len(), 1, "A's packet reached B");
    // (boringtun stamps events with the time of its last timer run: time passes in runs.)
    run_for(&mut p, Duration::from_secs(1));
    let data = p.send_a(&[ipv4("10.0.0.1", "10.0.0.2", b"one way")]);
    assert_eq!(p.exchange(vec![], data).1.len(), 1);
    // B got data and sent nothing back: KEEPALIVE_TIMEOUT after it last sent (its handshake
    // response, a second before the data) it sends one keepalive, and only one.
    let (_, from_b) = run_for(&mut p, Duration::from_secs(30));
    assert_eq!(keepalives(&from_b), vec![Duration::from_secs(9)]);
}

#[test]
fn the_initiator_rekeys_when_it_sends_after_two_minutes() {
    let mut p = Pair::new(&["10.0.0.2/32"]);
    p.connect();
    let (from_a, _) = run_for(&mut p, Duration::from_secs(119));
    assert!(
        initiations(&from_a).is_empty(),
        "no rekey while the session is young"
    );
    let data = p.send_a(&[ipv4("10.0.0.1", "10.0.0.2", b"still here")]);
    assert_eq!(data[0][0], DATA, "the old session still carries data");
    let (at_a, at_b) = p.exchange(vec![], data);
    assert_eq!((at_a.len(), at_b.len()), (0, 1));
    // Past REKEY_AFTER_TIME, having sent: the next timer run starts a handshake.
    let (from_a, _) = run_for(&mut p, Duration::from_secs(2));
    assert_eq!(initiations(&from_a).len(), 1, "REKEY_AFTER_TIME on send");
    let since = p.a.peer(&pubkey(key(2))).unwrap().since_handshake;
    assert!(since.is_some_and(|s| s >= Duration::from_secs(120)));
}

#[test]
fn a_session_older_than_three_minutes_carries_no_data() {
    let mut p = Pair::new(&["10.0.0.2/32"]);
    p.connect();
    let (from_a, _) = run_for(&mut p, Duration::from_secs(181));
    assert!(initiations(&from_a).is_empty(), "A sent nothing: no rekey");
    // REJECT_AFTER_TIME: the session may no longer encrypt; a packet starts a handshake.
    // (boringtun drops the session in its timer run: without runs it would still encrypt,
    // which is why the shell must honour poll_timeout.)
    let out = p.send_a(&[ipv4("10.0.0.1", "10.0.0.2", b"late")]);
    let kinds: Vec<(u8, usize)> = out.iter().map(|d| (d[0], d.len())).collect();
    assert_eq!(kinds, vec![(INIT, 148)]);
    // And completing it delivers the queued packet.
    let (_, at_b) = p.exchange(vec![], out);
    assert_eq!(at_b.len(), 1);
}

#[test]
fn after_nine_minutes_without_a_handshake_every_key_is_dropped() {
    let mut p = Pair::new(&["10.0.0.2/32"]);
    p.connect();
    let (from_a, _) = run_for(&mut p, Duration::from_secs(541));
    assert!(
        initiations(&from_a).is_empty(),
        "nothing was sent: no rekey"
    );
    // REJECT_AFTER_TIME * 3: sessions and handshake state are zeroed on both sides: no
    // handshake to report, and the next packet needs a new one.
    let st = p.a.peer(&pubkey(key(2))).unwrap();
    assert_eq!(st.since_handshake, None);
    assert_eq!(
        st.handshake_failures, 0,
        "an idle session's keys dropped is no failure"
    );
    let next = p.send_b(&[ipv4("10.0.0.2", "10.0.0.1", b"after the wipe")]);
    let kinds: Vec<u8> = next.iter().map(|d| d[0]).collect();
    assert_eq!(kinds, vec![INIT]);
    let (at_a, _) = p.exchange(next, vec![]);
    assert_eq!(at_a.len(), 1, "a new handshake, and the packet arrives");
}

#[test]
fn handshakes_over_the_rate_limit_get_cookies_until_the_next_second() {
    let mut p = Pair::new(&["10.0.0.2/32"]);
    let init = p.send_b(&[ipv4("10.0.0.2", "10.0.0.1", b"x")]);
    let from = "198.51.100.9:5000".parse().unwrap();
    let mut out = Outbox::default();
    p.a.handle_network(
        p.now,
        (0..(HANDSHAKE_RATE_LIMIT + 20)).map(|_| (from, init[0].as_slice())),
        &mut out,
    );
    let cookies = out
        .net_packets()
        .filter(|(to, d)| *to == from && d[0] == 3)
        .count();
    assert!(
        cookies >= 19,
        "cookie replies once over the limit, got {cookies}"
    );
    // Still within the second: cookies. A second later the window starts again: an answer.
    out.clear();
    advance(&mut p, Duration::from_millis(500));
    p.a.handle_network(p.now, [(from, init[0].as_slice())], &mut out);
    assert_eq!(out.net_packets().filter(|(_, d)| d[0] == 3).count(), 1);
    out.clear();
    advance(&mut p, Duration::from_millis(600));
    p.a.handle_network(p.now, [(from, init[0].as_slice())], &mut out);
    assert_eq!(out.net_packets().filter(|(_, d)| d[0] == 3).count(), 0);
}
