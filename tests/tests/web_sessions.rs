//! Web console sessions: they act exactly as their API token, expire after 12 hours, end when
//! the token is revoked or the browser signs out, and a cookie that is not one gets nothing.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use canopy_proto::v1::{CreateApiTokenRequest, RevokeApiTokenRequest};
use canopy_tests::TestController;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_expire_end_with_their_token_and_on_sign_out() {
    let c = TestController::with_manual_clock().await;
    let ctl = &c.server.controller;
    let (cookie, s) = ctl.sign_in(&c.server.admin_token).await.unwrap();
    assert!(cookie.starts_with("cws_") && s.csrf.len() >= 43);
    assert_eq!(
        ctl.web_session(&cookie).await.unwrap().caller.token_id,
        s.caller.token_id
    );

    // 12 hours on: signed out.
    c.clock.advance(Duration::from_secs(12 * 3600 + 1));
    let e = ctl.web_session(&cookie).await.unwrap_err();
    assert!(e.to_string().contains("sign in again"), "{e}");

    // A read token's session acts as read, and ends when the token is revoked.
    let mut con = c.console().await;
    let req = CreateApiTokenRequest {
        name: "viewer".into(),
        scope: "read".into(),
    };
    let made = con.create_api_token(req).await.unwrap().into_inner();
    let (cookie, s) = ctl.sign_in(&made.secret).await.unwrap();
    assert!(s.caller.require_admin().is_err());
    let revoke = RevokeApiTokenRequest {
        token_id: made.token.unwrap().id,
    };
    con.revoke_api_token(revoke).await.unwrap();
    assert!(
        ctl.web_session(&cookie).await.is_err(),
        "revoked token, no session"
    );

    // Signing out ends it; made-up cookies and tokens get nothing.
    let (cookie, _) = ctl.sign_in(&c.server.admin_token).await.unwrap();
    ctl.sign_out(&cookie).await.unwrap();
    assert!(ctl.web_session(&cookie).await.is_err());
    for bad in ["", "cws_", "cws_x", &"cws_A".repeat(100), "cat_notatoken"] {
        assert!(ctl.web_session(bad).await.is_err(), "{bad}");
    }
    assert!(ctl.sign_in("cat_made_up").await.is_err());
}
