//! `/export.csv`: the filtered trail in GitLab's audit events export columns, streamed as it is
//! read (a channel-fed body), so an export of any size needs memory for one chunk.

use super::*;

/// GitLab's audit events export columns.
const CSV_COLUMNS: [&str; 12] = [
    "ID",
    "Author ID",
    "Author Name",
    "Entity ID",
    "Entity Type",
    "Entity Path",
    "Target ID",
    "Target Type",
    "Target Details",
    "Action",
    "IP Address",
    "Created At (UTC)",
];

fn csv_row(e: &AuditEvent) -> [String; 12] {
    [
        e.id.clone(),
        e.author_id.to_string(),
        e.author_name.clone(),
        e.entity_id.map(|i| i.to_string()).unwrap_or_default(),
        e.entity_type.clone(),
        e.entity_path.clone(),
        String::new(),
        e.target_type.clone(),
        e.target_details.clone(),
        e.details.custom_message.clone(),
        e.ip_address.clone(),
        e.created_at.get(..19).unwrap_or(&e.created_at).replace('T', " "),
    ]
}

/// A response body fed by a channel, so a large export streams in bounded memory.
struct ChannelBody(tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
        self.0.poll_recv(cx).map(|item| item.map(|r| r.map(http_body::Frame::data)))
    }
}

pub async fn export_csv(State(s): State<Shared>, r: Reader, Query(f): Query<Filters>) -> Response {
    let mut query = match f.query() {
        Ok(q) => q,
        Err(why) => return bad_request(&why),
    };
    match r.visible(&s).await {
        Ok(visible) => visible.narrow(&mut query),
        Err(refused) => return refused,
    }
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let source = s.clone();
    tokio::task::spawn_blocking(move || {
        let mut before: Option<Position> = None;
        let mut header = true;
        loop {
            let page = match source.store().page(&query, before.as_ref(), 0, 1000) {
                Ok(p) => p,
                Err(e) => {
                    let _ = tx.blocking_send(Err(std::io::Error::other(format!("{e:#}"))));
                    return;
                }
            };
            let mut w = csv::Writer::from_writer(Vec::new());
            if std::mem::take(&mut header) {
                let _ = w.write_record(CSV_COLUMNS);
            }
            for (_, e) in &page.events {
                let _ = w.write_record(csv_row(e));
            }
            let chunk = w.into_inner().unwrap_or_default();
            if tx.blocking_send(Ok(Bytes::from(chunk))).is_err() {
                return; // the client went away
            }
            match page.next {
                Some(next) => before = Some(next),
                None => return,
            }
        }
    });
    (
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8"),
            (header::CONTENT_DISPOSITION, "attachment; filename=\"audit-events.csv\""),
        ],
        Body::new(ChannelBody(rx)),
    )
        .into_response()
}
