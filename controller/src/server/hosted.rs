//! `HostedService`: sign-up (no credential), then subscription, plan and usage for the tenant of
//! the bearer API token.

use canopy_proto::v1::hosted_service_server::HostedService;
use canopy_proto::v1::*;
use tonic::{Request, Response, Status};

use crate::service::{Caller, Controller};

pub struct HostedApi {
    ctl: Controller,
}

impl HostedApi {
    pub fn new(ctl: Controller) -> Self {
        Self { ctl }
    }

    async fn caller<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        super::console_caller(&self.ctl, req).await
    }
}

type R<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl HostedService for HostedApi {
    async fn sign_up(&self, req: Request<SignUpRequest>) -> R<SignUpResponse> {
        // Anonymous: throttled per source address before anything is read or written.
        self.ctl
            .check_signup_rate(req.remote_addr().map(|a| a.ip()))?;
        let r = req.into_inner();
        let (tenant_id, secret, sub) = self.ctl.sign_up(&r.org, &r.email, &r.plan).await?;
        Ok(Response::new(SignUpResponse {
            tenant_id,
            api_token: secret.expose().to_string(),
            subscription: Some(sub),
        }))
    }

    async fn get_subscription(&self, req: Request<GetSubscriptionRequest>) -> R<Subscription> {
        let c = self.caller(&req).await?;
        Ok(Response::new(self.ctl.subscription(&c).await?))
    }

    async fn change_plan(&self, req: Request<ChangePlanRequest>) -> R<Subscription> {
        let c = self.caller(&req).await?;
        let sub = self.ctl.change_plan(&c, &req.into_inner().plan).await?;
        self.ctl
            .audit(&c.tenant, &c.token_id, "plan.change", &c.tenant, &sub.plan)
            .await;
        Ok(Response::new(sub))
    }

    async fn get_usage(&self, req: Request<GetUsageRequest>) -> R<Usage> {
        let c = self.caller(&req).await?;
        Ok(Response::new(self.ctl.usage(&c).await?))
    }
}
