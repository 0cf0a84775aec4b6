//! Regions: a router serves the users homed in its region and sends the
//! others to a router of their home region.
//!
//! * A router has a region (`--region`, default `local`) and knows routers
//!   of other regions (`--region-router NAME=URL`, repeatable).
//! * A user's home region is stored on the user row (`User.home_region`),
//!   set at sign-up to the region of the router that registered them. An
//!   empty home region (accounts older than regions) is served anywhere.
//! * Login of a user homed elsewhere, once the password checked out, and
//!   WebSocket connections with such a user's session answer `wrong_region`
//!   with the home region and a router URL there (HTTP 421 for login; an
//!   error frame then close 4010 on the WebSocket). No session is created.
//! * Everything else is global: the cluster is one, so conversations with
//!   members homed in several regions work from every side.

use std::collections::BTreeMap;

use axum::extract::ws::{CloseFrame, Message, WebSocket};

use crate::error::ApiError;

/// The region a router has when none is configured.
pub const DEFAULT_REGION: &str = "local";
/// WebSocket close code after a `wrong_region` error frame.
pub const CLOSE_WRONG_REGION: u16 = 4010;

/// This router's region and the routers it knows in others.
#[derive(Debug, Clone)]
pub struct Regions {
    pub mine: String,
    /// Region → base URL of a router there (e.g. `https://eu.example.com`).
    pub routers: BTreeMap<String, String>,
}

impl Default for Regions {
    fn default() -> Self {
        Regions {
            mine: DEFAULT_REGION.to_string(),
            routers: BTreeMap::new(),
        }
    }
}

/// Whether `name` is a valid region name (the model's rule).
pub fn check_name(name: &str) -> Result<(), String> {
    if natter_model::valid_region(name) && !name.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "bad region {name:?}: 1 to {} characters of a-z, 0-9, '-' and '_'",
            natter_model::MAX_REGION_BYTES
        ))
    }
}

/// Parses `NAME=URL` (a router of region NAME).
pub fn parse_region_router(s: &str) -> Result<(String, String), String> {
    let (name, url) = s
        .split_once('=')
        .ok_or_else(|| format!("bad region router {s:?}: expected NAME=URL"))?;
    let (name, url) = (name.trim(), url.trim().trim_end_matches('/'));
    check_name(name)?;
    if !(url.starts_with("http://") || url.starts_with("https://")) || url.len() > 2048 {
        return Err(format!(
            "bad region router URL {url:?}: expected http(s)://host[:port]"
        ));
    }
    Ok((name.to_string(), url.to_string()))
}

impl Regions {
    /// Ok when this router serves users homed in `home`; else the
    /// `wrong_region` error naming a router there.
    pub fn check(&self, home: &str) -> Result<(), ApiError> {
        if home.is_empty() || home == self.mine {
            return Ok(());
        }
        Err(ApiError::WrongRegion {
            home_region: home.to_string(),
            router_url: self.routers.get(home).cloned(),
        })
    }
}

/// The home region of a user (a linearizable read of the user row).
pub async fn home_region(
    cluster: &crate::cluster::Cluster,
    user_id: &str,
    deadline: std::time::Instant,
) -> Result<String, ApiError> {
    use natter_model::pb::{self, query::Q, response::R};
    let r = cluster
        .query(
            Q::GetUser(pb::GetUser {
                user_id: user_id.to_string(),
            }),
            deadline,
        )
        .await?;
    match crate::error::check(r)? {
        R::User(u) => Ok(u.home_region),
        other => Err(ApiError::unexpected(&other)),
    }
}

/// Answers an upgraded WebSocket with the `wrong_region` error frame and
/// closes it (4010).
pub async fn refuse(mut socket: WebSocket, err: ApiError) {
    let frame = serde_json::json!({"v": 1, "id": null, "error": err.json()});
    crate::metrics::frame_out(&frame);
    let send = async {
        socket.send(Message::Text(frame.to_string().into())).await?;
        socket
            .send(Message::Close(Some(CloseFrame {
                code: CLOSE_WRONG_REGION,
                reason: "wrong region".into(),
            })))
            .await
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), send).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_of_other_regions_are_sent_to_a_router_there() {
        let r = Regions {
            mine: "a".into(),
            routers: [("b".to_string(), "http://b.example:80".to_string())].into(),
        };
        r.check("a").unwrap();
        r.check("").unwrap();
        match r.check("b").unwrap_err() {
            ApiError::WrongRegion {
                home_region,
                router_url,
            } => {
                assert_eq!(home_region, "b");
                assert_eq!(router_url.as_deref(), Some("http://b.example:80"));
            }
            e => panic!("{e:?}"),
        }
        let e = r.check("c").unwrap_err();
        assert_eq!(e.code(), "wrong_region");
        assert_eq!(e.status().as_u16(), 421);
        assert_eq!(e.json()["router_url"], serde_json::Value::Null);
        assert_eq!(e.json()["home_region"], "c");
    }

    #[test]
    fn region_routers_and_names_are_checked() {
        assert_eq!(
            parse_region_router("eu-west=https://eu.example.com/").unwrap(),
            ("eu-west".to_string(), "https://eu.example.com".to_string())
        );
        for bad in [
            "eu",
            "=http://x",
            "EU=http://x",
            "eu=ftp://x",
            "e u=http://x",
        ] {
            assert!(parse_region_router(bad).is_err(), "{bad}");
        }
        check_name("local").unwrap();
        assert!(check_name("").is_err());
        assert!(check_name(&"a".repeat(65)).is_err());
    }
}
