//! The page's history charts, drawn on the server as SVG (no script): a
//! line per figure over the steps of a [`History`], with a summary for
//! screen readers and, beside each chart, the same figures as a table.

use chrono::{DateTime, Utc};
use maud::{Markup, html};

use super::view::header_row;
use crate::history::{History, Range};

/// One line of a chart: its CSS class, its name, a value per step.
pub struct Line {
    pub class: &'static str,
    pub name: &'static str,
    pub values: Vec<Option<i64>>,
}

const WIDTH: f64 = 600.0;
const HEIGHT: f64 = 180.0;
/// Room for the axis labels.
const LEFT: f64 = 48.0;
const BOTTOM: f64 = 20.0;
const TOP: f64 = 8.0;

/// A chart of `lines` over `steps`, titled `title`; `id` makes its ids.
pub fn chart(
    id: &str,
    title: &str,
    range: Range,
    steps: &[DateTime<Utc>],
    lines: &[Line],
) -> Markup {
    let known = || {
        lines
            .iter()
            .flat_map(|l| l.values.iter().flatten().copied())
    };
    let lo = known().min().unwrap_or(0).min(0);
    let hi = known().max().unwrap_or(1).max(lo + 1);
    let x = |i: usize| LEFT + (WIDTH - LEFT) * i as f64 / (steps.len().max(2) - 1) as f64;
    let y = |v: i64| TOP + (HEIGHT - TOP - BOTTOM) * (hi - v) as f64 / (hi - lo) as f64;
    let summary = summary(title, range, lines);
    let day = |t: &DateTime<Utc>| t.format("%Y-%m-%d").to_string();
    html! {
        figure.chart {
            svg role="img" aria-labelledby=(format!("{id}-summary")) viewBox=(format!("0 0 {WIDTH} {HEIGHT}")) {
                title #(format!("{id}-summary")) { (summary) }
                line.axis x1=(LEFT) y1=(y(lo)) x2=(WIDTH) y2=(y(lo)) {}
                @if lo < 0 {
                    line.zero x1=(LEFT) y1=(y(0)) x2=(WIDTH) y2=(y(0)) {}
                }
                text.tick x=(LEFT - 4.0) y=(y(hi) + 4.0) text-anchor="end" { (hi) }
                text.tick x=(LEFT - 4.0) y=(y(lo)) text-anchor="end" { (lo) }
                @if let (Some(first), Some(last)) = (steps.first(), steps.last()) {
                    text.tick x=(LEFT) y=(HEIGHT - 4.0) { (day(first)) }
                    text.tick x=(WIDTH) y=(HEIGHT - 4.0) text-anchor="end" { (day(last)) }
                }
                @for line in lines {
                    @for points in segments(&line.values, &x, &y) {
                        polyline class=(line.class) points=(points) {}
                    }
                }
            }
            figcaption {
                ul.legend {
                    @for line in lines {
                        li { span class=(format!("key {}", line.class)) {} (line.name) }
                    }
                }
            }
        }
        details.data {
            summary { "The figures as a table" }
            div.scroll role="region" tabindex="0" aria-label=(format!("{title}, the figures")) {
                table {
                    caption.visually-hidden { (title) ", at the end of each day a figure changed" }
                    (header_row(std::iter::once("Until").chain(lines.iter().map(|l| l.name))))
                    tbody {
                        @for i in changed(lines, steps.len()) {
                            tr {
                                th scope="row" { time datetime=(steps[i].to_rfc3339()) { (day(&steps[i])) } }
                                @for line in lines {
                                    td.number { @if let Some(v) = line.values[i] { (v) } @else { "-" } }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The `points` of each run of known values.
fn segments(
    values: &[Option<i64>],
    x: &impl Fn(usize) -> f64,
    y: &impl Fn(i64) -> f64,
) -> Vec<String> {
    let mut out = Vec::new();
    let mut run = String::new();
    for (i, v) in values.iter().enumerate() {
        match v {
            Some(v) => {
                use std::fmt::Write;
                let _ = write!(run, "{:.1},{:.1} ", x(i), y(*v));
            }
            None if !run.is_empty() => out.push(std::mem::take(&mut run)),
            None => {}
        }
    }
    if !run.is_empty() {
        out.push(run);
    }
    out
}

/// The steps where some figure differs from the step before, the first
/// known step and the last: a table as short as the history allows.
fn changed(lines: &[Line], steps: usize) -> Vec<usize> {
    let at = |i: usize| lines.iter().map(|l| l.values[i]).collect::<Vec<_>>();
    (0..steps)
        .filter(|&i| {
            let now = at(i);
            now.iter().any(Option::is_some) && (i == 0 || i + 1 == steps || now != at(i - 1))
        })
        .collect()
}

/// "TestOps over the last 30 days: total 200 to 250, dedicated 5 to 10, …".
fn summary(title: &str, range: Range, lines: &[Line]) -> String {
    let figures: Vec<String> = lines
        .iter()
        .filter_map(|l| {
            let mut known = l.values.iter().flatten();
            let first = known.next()?;
            let last = known.last().unwrap_or(first);
            Some(match first == last {
                true => format!("{} {first}", l.name.to_lowercase()),
                false => format!("{} {first} to {last}", l.name.to_lowercase()),
            })
        })
        .collect();
    match figures.is_empty() {
        true => format!("{title} over {}: nothing recorded", range.words()),
        false => format!("{title} over {}: {}", range.words(), figures.join(", ")),
    }
}

/// The pools' charts and, for an organization, its allocations'.
pub fn history(h: &History, organization: &str) -> Markup {
    let range = h.range;
    let pool = |values: &[Option<crate::history::PoolFigures>],
                f: fn(&crate::history::PoolFigures) -> i64| {
        values.iter().map(|v| v.as_ref().map(f)).collect::<Vec<_>>()
    };
    html! {
        @for (i, (product, values)) in h.pools.iter().enumerate() {
            // Not a landmark of its own: the pools above are named the same.
            div.history-chart {
                h3 #(format!("history-pool-{i}-title")) { bdi { (product) } }
                (chart(&format!("history-pool-{i}"), product, range, &h.steps, &[
                    Line { class: "line-total", name: "Total", values: pool(values, |f| f.total) },
                    Line { class: "line-dedicated", name: "Dedicated", values: pool(values, |f| f.dedicated) },
                    Line { class: "line-in-use", name: "In use", values: pool(values, |f| f.in_use) },
                    Line { class: "line-free", name: "Free", values: pool(values, |f| f.free) },
                ]))
            }
        }
        @if !organization.is_empty() {
            @for (i, ((org, product), values)) in h.allocations.iter().enumerate() {
                div.history-chart {
                    h3 #(format!("history-allocation-{i}-title")) { bdi { (org) } ": " bdi { (product) } }
                    (chart(&format!("history-allocation-{i}"), &format!("{org}: {product}"), range, &h.steps, &[
                        Line { class: "line-dedicated", name: "Dedicated", values: values.iter().map(|v| v.map(|a| a.dedicated)).collect() },
                        Line { class: "line-in-use", name: "In use", values: values.iter().map(|v| v.map(|a| a.in_use)).collect() },
                    ]))
                }
            }
        }
    }
}
