//! Leases the differ takes in containerd so that a diff it stores is not collected before its
//! caller references it. containerd's proxy differ client does not forward the caller's lease
//! (a Diff request arrives with none), and content written without a lease is unreferenced
//! the moment it is committed: the next garbage collection would delete it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use containerd_api::containerd::services::leases::v1 as pb;
use containerd_api::containerd::services::leases::v1::leases_client::LeasesClient;
use snapshotter::Result;
use tonic::transport::Channel;

use crate::content::{status_to_core, with_namespace};

/// How long a diff stored without the caller's lease is kept: the caller has this long to
/// reference it (an image manifest, a label, its own lease), as with containerd's own
/// expiring leases.
pub const DIFF_LEASE_TTL: Duration = Duration::from_secs(3600);

/// Create a lease in `namespace` that containerd deletes by itself after `ttl`; its id.
pub async fn expiring(channel: Channel, namespace: &str, ttl: Duration) -> Result<String> {
    let expire = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .saturating_add(ttl);
    let req = with_namespace(
        pb::CreateRequest {
            id: String::new(),
            labels: [(
                "containerd.io/gc.expire".to_string(),
                rfc3339_utc(expire.as_secs()),
            )]
            .into(),
        },
        namespace,
    )?;
    let lease = LeasesClient::new(channel)
        .create(req)
        .await
        .map_err(status_to_core)?
        .into_inner()
        .lease
        .map(|l| l.id)
        .unwrap_or_default();
    Ok(lease)
}

/// `secs` since the epoch as RFC 3339 in UTC (`2026-11-28T01:02:03Z`), the format containerd
/// parses `containerd.io/gc.expire` in.
fn rfc3339_utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (proleptic Gregorian; eras of 400 years).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::rfc3339_utc;

    #[test]
    fn formats_utc_dates() {
        assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00Z");
        // `date -u -d @951782400`: the leap day of a year divisible by 400.
        assert_eq!(rfc3339_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339_utc(1_798_761_599), "2026-12-31T23:59:59Z");
        assert_eq!(rfc3339_utc(4_107_542_400), "2100-03-01T00:00:00Z");
    }
}
