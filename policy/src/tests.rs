use proptest::prelude::*;

use super::compile::{Peers, part, sees};
use super::eval::{Packet, PeerView, Verdict, allows, explain};
use super::*;

const EXAMPLE: &str = r#"
tags = ["web", "db", "cache", "ops"]

[groups]
backend = ["db", "cache"]

[[rule]]
name = "web reaches the databases"
from = ["tag:web"]
to = ["group:backend"]
proto = "tcp"
ports = ["5432", "6379-6380"]

[[rule]]
from = ["tag:ops"]
to = ["*"]
"#;

fn err(text: &str) -> PolicyError {
    parse(text).unwrap_err()
}

#[test]
fn a_policy_document_parses_into_rules_with_groups_expanded() {
    let p = parse(EXAMPLE).unwrap();
    assert_eq!(p.rules.len(), 2);
    let r = &p.rules[0];
    assert_eq!((r.name.as_str(), r.line), ("web reaches the databases", 7));
    assert_eq!(r.from, vec![Selector::Tag("web".into())]);
    assert_eq!(
        r.to,
        vec![Selector::Tag("cache".into()), Selector::Tag("db".into())]
    );
    assert_eq!(r.proto, Proto::Tcp);
    let ports: Vec<String> = r.ports.iter().map(ToString::to_string).collect();
    assert_eq!(ports, ["5432", "6379-6380"]);
    assert_eq!(
        (p.rules[1].name.as_str(), p.rules[1].proto),
        ("rule 2", Proto::Any)
    );
    assert_eq!(
        parse("").unwrap().rules.len(),
        0,
        "an empty policy denies everything"
    );
}

#[test]
fn mistakes_are_refused_naming_the_line_and_the_rule() {
    let e = err("tags = [\"web\"]\n\n[[rule]]\nfrom = [\"tag:web\"]\nto = [\"tag:db\"]\n");
    assert_eq!(
        e.to_string(),
        "line 5, rule 1: to: tag \"db\" is not declared in `tags`"
    );
    let e = err(
        "tags = [\"web\"]\n[[rule]]\nname = \"x\"\nfrom = [\"*\"]\nto = [\"*\"]\nproto = \"tcp\"\nports = [\"80-70\"]\n",
    );
    assert_eq!(e.line, 7);
    assert_eq!(e.rule.as_deref(), Some("x"));
    assert!(e.message.contains("80-70"), "{e}");
    let e = err("[[rule]]\nfrom = [\"*\"]\nto = [\"*\"]\nproto = \"icmp\"\nports = [\"1\"]\n");
    assert!(e.to_string().contains("ports need proto tcp or udp"), "{e}");
    let e = err("[[rule]]\nfrom = [\"*\"]\nto = [\"*\"]\nproto = \"sctp\"\n");
    assert!(
        e.to_string()
            .starts_with("line 4, rule 1: protocol \"sctp\""),
        "{e}"
    );
    let e = err("[[rule]]\nfrom = [\"10.0.0.0/8\"]\nto = [\"*\"]\n");
    assert!(e.to_string().contains("destinations only"), "{e}");
    let e = err("[[rule]]\nfrom = [\"*\"]\nto = [\"10.0.0.1/8\"]\n");
    assert!(e.to_string().contains("did you mean 10.0.0.0/8"), "{e}");
    let e = err("[[rule]]\nfrom = []\nto = [\"*\"]\n");
    assert!(e.to_string().contains("`from` needs 1 to"), "{e}");
    let e = err("[[rule]]\nfrom = [\"group:nope\"]\nto = [\"*\"]\n");
    assert!(e.to_string().contains("no group \"nope\""), "{e}");
    let e = err("[groups]\ng = [\"undeclared\"]\n");
    assert_eq!(e.line, 2);
    let e = err("[[rule]]\nfrom = [\"*\"]\nto = [\"*\"]\nprots = \"tcp\"\n");
    assert!(e.line == 4 && e.message.contains("prots"), "{e}");
    let e = err("[[rule]\n");
    assert_eq!(e.line, 1, "{e}");
    let e = err(&"#".repeat(MAX_BYTES + 1));
    assert!(e.to_string().contains("at most"), "{e}");
}

fn addr(s: &str) -> Vec<IpNetwork> {
    vec![s.parse().unwrap()]
}

fn tcp(port: u16, dst: &str) -> Packet {
    Packet {
        proto: Proto::Tcp,
        port,
        dst: dst.parse().unwrap(),
    }
}

#[test]
fn the_evaluator_allows_what_a_rule_allows_and_explains_a_refusal() {
    let p = parse(EXAMPLE).unwrap();
    let (web_tags, db_tags) = (vec!["web".to_string()], vec!["db".to_string()]);
    let (wa, da) = (addr("100.64.0.1/32"), addr("100.64.0.2/32"));
    let web = PeerView {
        id: "peer_web",
        tags: &web_tags,
        addresses: &wa,
        routes: &[],
    };
    let db = PeerView {
        id: "peer_db",
        tags: &db_tags,
        addresses: &da,
        routes: &[],
    };
    assert_eq!(
        allows(Some(&p), &web, &db, &tcp(5432, "100.64.0.2")),
        Verdict::Allowed(0)
    );
    assert_eq!(
        allows(Some(&p), &web, &db, &tcp(22, "100.64.0.2")),
        Verdict::Denied
    );
    assert_eq!(
        allows(Some(&p), &db, &web, &tcp(80, "100.64.0.1")),
        Verdict::Denied
    );
    assert_eq!(
        allows(None, &db, &web, &tcp(80, "100.64.0.1")),
        Verdict::NoPolicy
    );
    let (v, why) = explain(Some(&p), &web, &db, &tcp(22, "100.64.0.2"));
    assert_eq!(v, Verdict::Denied);
    assert!(
        why[0].contains("web reaches the databases (line 7) matches both peers but allows tcp/5432,6379-6380, not tcp/22"),
        "{why:?}"
    );
    let (_, why) = explain(Some(&p), &db, &web, &tcp(80, "100.64.0.1"));
    assert!(
        why[0].starts_with("no rule has `from` matching peer_db"),
        "{why:?}"
    );
    let (_, why) = explain(Some(&p), &web, &db, &tcp(5432, "100.64.0.2"));
    assert_eq!(why, ["allowed by web reaches the databases (line 7)"]);
}

#[test]
fn a_peers_part_lists_only_peers_it_may_talk_to_and_rules_about_it() {
    let p = parse(EXAMPLE).unwrap();
    let tags: Vec<Vec<String>> = [vec!["web"], vec!["db"], vec!["cache"], vec![], vec!["ops"]]
        .iter()
        .map(|t| t.iter().map(|s| s.to_string()).collect())
        .collect();
    let addrs: Vec<Vec<IpNetwork>> = (1..=5).map(|i| addr(&format!("100.64.0.{i}/32"))).collect();
    let ids = ["peer_web", "peer_db", "peer_cache", "peer_lone", "peer_ops"];
    let views: Vec<PeerView> = (0..5)
        .map(|i| PeerView {
            id: ids[i],
            tags: &tags[i],
            addresses: &addrs[i],
            routes: &[],
        })
        .collect();
    let peers = Peers::new(views.clone());
    let web = part(&p, &peers, &views[0]);
    let ids = web.ids(&peers);
    let visible: Vec<&str> = ids.iter().map(String::as_str).collect();
    assert_eq!(visible, ["peer_cache", "peer_db", "peer_ops"]);
    assert_eq!(web.inbound.len(), 1, "only the ops rule is about web");
    let lone = part(&p, &peers, &views[3]);
    let ids = lone.ids(&peers);
    let visible: Vec<&str> = ids.iter().map(String::as_str).collect();
    assert_eq!(
        visible,
        ["peer_ops"],
        "ops reaches everyone; nobody else reaches it"
    );
    let db = part(&p, &peers, &views[1]);
    assert!(db.admits(&views[0], &tcp(5432, "100.64.0.2")));
    assert!(!db.admits(&views[0], &tcp(22, "100.64.0.2")));
    assert!(!part(&p, &peers, &views[0]).admits(&views[1], &tcp(80, "100.64.0.1")));
}

// ----- compiled parts against the evaluator, on random policies and peers -----

const TAGS: [&str; 4] = ["a", "b", "c", "d"];

fn arb_selector(to: bool) -> impl Strategy<Value = String> {
    let mut options = vec![
        Just("*".to_string()).boxed(),
        (0..TAGS.len())
            .prop_map(|i| format!("tag:{}", TAGS[i]))
            .boxed(),
        Just("group:ab".to_string()).boxed(),
        (0..6usize).prop_map(|i| format!("peer_{i}")).boxed(),
    ];
    if to {
        options.push(
            (0..3u8)
                .prop_map(|i| format!("100.64.0.{}/31", i * 2))
                .boxed(),
        );
        options.push(Just("100.64.0.0/29".to_string()).boxed());
        // Sites behind gateways: a whole site, part of one, one holding two.
        options.push(Just("10.20.0.0/24".to_string()).boxed());
        options.push(Just("10.20.1.0/25".to_string()).boxed());
        options.push(Just("10.0.0.0/8".to_string()).boxed());
    }
    proptest::strategy::Union::new(options)
}

fn arb_rule() -> impl Strategy<Value = String> {
    (
        proptest::collection::vec(arb_selector(false), 1..3),
        proptest::collection::vec(arb_selector(true), 1..3),
        0..4usize,
        proptest::collection::vec((1u16..40, 0u16..5), 0..3),
    )
        .prop_map(|(from, to, proto, ports)| {
            let q = |v: &[String]| {
                v.iter()
                    .map(|s| format!("{s:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let proto = ["any", "tcp", "udp", "icmp"][proto];
            let ports: Vec<String> = if matches!(proto, "tcp" | "udp") {
                ports
                    .iter()
                    .map(|(a, n)| format!("\"{a}-{}\"", a + n))
                    .collect()
            } else {
                Vec::new()
            };
            format!(
                "[[rule]]\nfrom = [{}]\nto = [{}]\nproto = \"{proto}\"\nports = [{}]\n",
                q(&from),
                q(&to),
                ports.join(", ")
            )
        })
}

fn arb_policy() -> impl Strategy<Value = String> {
    proptest::collection::vec(arb_rule(), 0..6).prop_map(|rules| {
        format!(
            "tags = [\"a\", \"b\", \"c\", \"d\"]\n[groups]\nab = [\"a\", \"b\"]\n{}",
            rules.join("\n")
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    #[test]
    fn compiled_parts_allow_exactly_what_the_evaluator_allows(
        text in arb_policy(),
        peer_tags in proptest::collection::vec(proptest::collection::btree_set(0..TAGS.len(), 0..3), 6),
    ) {
        let policy = parse(&text).unwrap();
        let tags: Vec<Vec<String>> = peer_tags
            .iter()
            .map(|s| s.iter().map(|&i| TAGS[i].to_string()).collect())
            .collect();
        // Two addresses each, one inside the rules' CIDRs and one outside.
        let addrs: Vec<Vec<IpNetwork>> = (0..6)
            .map(|i| [format!("100.64.0.{i}/32"), format!("100.64.1.{i}/32")].iter().map(|a| a.parse().unwrap()).collect())
            .collect();
        let ids: Vec<String> = (0..6).map(|i| format!("peer_{i}")).collect();
        // peer_1 is the gateway to 10.20.0.0/16, peer_2 to 10.20.1.0/24 and 10.30.0.0/16.
        let routes: Vec<Vec<IpNetwork>> = (0..6)
            .map(|i| match i {
                1 => addr("10.20.0.0/16"),
                2 => [addr("10.20.1.0/24"), addr("10.30.0.0/16")].concat(),
                _ => Vec::new(),
            })
            .collect();
        let views: Vec<PeerView> = (0..6)
            .map(|i| PeerView { id: &ids[i], tags: &tags[i], addresses: &addrs[i], routes: &routes[i] })
            .collect();
        let peers = Peers::new(views.clone());
        // Where packets may end at a peer: its addresses, and addresses in and around its sites.
        let site: Vec<std::net::IpAddr> = ["10.20.0.7", "10.20.1.9", "10.20.1.200", "10.30.4.4", "10.40.0.1"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        for (qi, q) in views.iter().enumerate() {
            let mine = part(&policy, &peers, q);
            for (pi, p) in views.iter().enumerate() {
                if pi == qi {
                    prop_assert!(!mine.sees(p.id));
                    continue;
                }
                let mut any_way = false;
                let dsts = q.addresses.iter().map(|a| a.ip()).chain(site.iter().copied().filter(|_| !q.routes.is_empty()));
                for (dst, proto) in dsts.flat_map(|a| [Proto::Tcp, Proto::Udp, Proto::Icmp].map(|p| (a, p))) {
                    for port in [0u16, 1, 3, 20, 39, 44, 80] {
                        let pkt = Packet { proto, port: if proto == Proto::Icmp { 0 } else { port }, dst };
                        let naive = allows(Some(&policy), p, q, &pkt).allowed();
                        prop_assert_eq!(mine.admits(p, &pkt), naive, "{} → {} {:?}\n{}", p.id, q.id, pkt, text);
                        let back = Packet { dst: p.addresses[0].ip(), ..pkt };
                        any_way |= naive || allows(Some(&policy), q, p, &back).allowed();
                    }
                }
                // Every peer an allowed packet needs is visible (either direction), and the
                // pairwise check agrees with the whole part.
                if any_way {
                    prop_assert!(mine.sees(p.id), "{} should see {}\n{}", q.id, p.id, text);
                }
                prop_assert_eq!(sees(&policy, q, p), mine.sees(p.id), "{} / {}\n{}", q.id, p.id, text);
            }
        }
    }
}

#[test]
fn the_readme_policy_example_parses_and_its_test_output_is_true() {
    let readme = include_str!("../../README.md");
    let start = readme.find("# prod.policy.toml").unwrap();
    let end = start + readme[start..].find("```").unwrap();
    let p = parse(&readme[start..end]).unwrap();
    assert_eq!(p.rules.len(), 2);
    let claim = format!("allowed by {} (line {})", p.rules[0].name, p.rules[0].line);
    assert!(readme.contains(&claim), "README should say {claim:?}");
}

#[test]
fn control_characters_never_get_into_a_stored_document() {
    // `canopy policy get` prints the document as it is: TOML refuses control characters
    // (but tabs) even in comments and strings, so no terminal escape can be stored.
    for bad in [
        "# \u{1b}[2J\n",
        "tags = [\"\u{7}\"]\n",
        "[[rule]]\nname = \"a\u{1b}]0;x\"\nfrom = [\"*\"]\nto = [\"*\"]\n",
    ] {
        assert!(parse(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn auto_approvers_are_checked_and_take_prefixes_inside_theirs_only() {
    let text = "tags = [\"gw\"]\n[auto_approve]\n\"10.20.0.0/16\" = [\"tag:gw\"]\n";
    let p = parse(text).unwrap();
    let tags = vec!["gw".to_string()];
    let gw = PeerView {
        id: "peer_gw",
        tags: &tags,
        addresses: &[],
        routes: &[],
    };
    let other = PeerView { tags: &[], ..gw };
    let net = |s: &str| s.parse::<IpNetwork>().unwrap();
    assert!(p.auto_approves(&net("10.20.3.0/24"), &gw));
    assert!(p.auto_approves(&net("10.20.0.0/16"), &gw));
    assert!(
        !p.auto_approves(&net("10.0.0.0/8"), &gw),
        "wider than approved"
    );
    assert!(!p.auto_approves(&net("10.20.3.0/24"), &other), "untagged");
    for (bad, says) in [
        (
            "tags = []\n[auto_approve]\n\"10.20.0.0/16\" = [\"tag:gw\"]\n",
            "line 3",
        ),
        ("[auto_approve]\n\"10.20.0.1/16\" = [\"*\"]\n", "host bits"),
        ("[auto_approve]\n\"ten\" = [\"*\"]\n", "not a CIDR"),
        ("[auto_approve]\n\"10.0.0.0/8\" = []\n", "needs 1 to"),
        (
            "[auto_approve]\n\"10.0.0.0/8\" = [\"10.1.0.0/16\"]\n",
            "destinations only",
        ),
    ] {
        let e = parse(bad).unwrap_err().to_string();
        assert!(e.contains(says), "{bad:?}: {e}");
    }
}
