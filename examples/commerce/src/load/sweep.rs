//! A sweep's results: one row per offered rate, written as CSV and drawn as a
//! latency-vs-throughput chart (SVG). Pure: no network.

use std::fmt::Write as _;
use std::time::Duration;

use plotters::prelude::*;

/// One open-loop step of a sweep.
#[derive(Debug, Clone, PartialEq)]
pub struct SweepRow {
    /// Orders per second the schedule offered.
    pub offered: f64,
    /// Terminal states per second the system delivered (see `stats::achieved_rate`).
    pub achieved: f64,
    /// Scheduled send → terminal state, p50.
    pub terminal_p50: Duration,
    /// Scheduled send → terminal state, p99.
    pub terminal_p99: Duration,
    /// Scheduled send → terminal state, p99.9.
    pub terminal_p999: Duration,
    /// Scheduled send → POST answered, p99.
    pub post_p99: Duration,
    /// Scheduled sends not made because the outstanding-request cap was full.
    pub drops: u64,
    /// POSTs that failed (transport error or not 201).
    pub errors: u64,
    /// Invariant violations found after the step.
    pub violations: usize,
}

/// The CSV header and one line per row; latencies in milliseconds with 0.1 ms resolution.
pub fn csv(rows: &[SweepRow]) -> String {
    let mut out = String::from(
        "offered_rate,achieved_rate,terminal_p50_ms,terminal_p99_ms,terminal_p999_ms,\
         post_p99_ms,drops,errors,violations\n",
    );
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    for row in rows {
        // Writing to a String cannot fail.
        let _ = writeln!(
            out,
            "{},{:.1},{:.1},{:.1},{:.1},{:.1},{},{},{}",
            row.offered,
            row.achieved,
            ms(row.terminal_p50),
            ms(row.terminal_p99),
            ms(row.terminal_p999),
            ms(row.post_p99),
            row.drops,
            row.errors,
            row.violations
        );
    }
    out
}

/// A line of the chart: its legend, colour, and the row's value it plots.
type Series = (&'static str, RGBColor, fn(&SweepRow) -> Duration);

/// The chart as an SVG document: POST → terminal p50 / p99 / p99.9 (log scale, ms) against
/// achieved throughput, each point labelled with its offered rate. A system that keeps up
/// gives points at x ≈ offered; past saturation x stops growing and latency climbs.
pub fn chart_svg(rows: &[SweepRow], title: &str) -> anyhow::Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (900, 560)).into_drawing_area();
        root.fill(&WHITE)?;
        let ms = |d: Duration| (d.as_secs_f64() * 1e3).max(0.1);
        let x_max = rows
            .iter()
            .map(|r| r.achieved.max(r.offered))
            .fold(1.0, f64::max)
            * 1.1;
        let y_min = rows
            .iter()
            .map(|r| ms(r.terminal_p50))
            .fold(f64::INFINITY, f64::min)
            .min(1e4)
            / 2.0;
        let y_max = rows.iter().map(|r| ms(r.terminal_p999)).fold(1.0, f64::max) * 2.0;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..x_max, (y_min..y_max).log_scale())?;
        chart
            .configure_mesh()
            // A log axis gets a light line per minor step: too dense to read.
            .light_line_style(WHITE)
            .x_desc("achieved throughput (terminal orders/s)")
            .y_desc("scheduled send → terminal (log scale)")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| label_ms(*y))
            .draw()?;
        let series: [Series; 3] = [
            ("p50", BLUE, |r| r.terminal_p50),
            ("p99", RGBColor(230, 120, 0), |r| r.terminal_p99),
            ("p99.9", RED, |r| r.terminal_p999),
        ];
        for (name, color, value) in series {
            let points: Vec<(f64, f64)> = rows.iter().map(|r| (r.achieved, ms(value(r)))).collect();
            chart
                .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
            chart.draw_series(
                points
                    .into_iter()
                    .map(|p| Circle::new(p, 4, color.filled())),
            )?;
        }
        chart.draw_series(rows.iter().map(|r| {
            // Beside the p99.9 point, not on it.
            EmptyElement::at((r.achieved, ms(r.terminal_p999)))
                + Text::new(
                    format!("{}/s offered", r.offered),
                    (8, -14),
                    ("sans-serif", 13),
                )
        }))?;
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
    }
    Ok(svg)
}

/// An axis label for `ms` milliseconds: `250ms`, `2s`, `1.5s`.
fn label_ms(ms: f64) -> String {
    if ms >= 1000.0 {
        format!("{}s", (ms / 100.0).round() / 10.0)
    } else {
        format!("{}ms", (ms * 10.0).round() / 10.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(offered: f64, achieved: f64, p50_ms: u64) -> SweepRow {
        SweepRow {
            offered,
            achieved,
            terminal_p50: Duration::from_millis(p50_ms),
            terminal_p99: Duration::from_millis(p50_ms * 3),
            terminal_p999: Duration::from_micros(p50_ms * 4_000 + 60),
            post_p99: Duration::from_micros(12_345),
            drops: 0,
            errors: 1,
            violations: 0,
        }
    }

    #[test]
    fn csv_has_a_header_and_one_line_per_step_in_milliseconds() {
        let text = csv(&[row(50.0, 49.96, 120), row(100.0, 81.25, 2_000)]);
        assert_eq!(
            text,
            "offered_rate,achieved_rate,terminal_p50_ms,terminal_p99_ms,terminal_p999_ms,\
             post_p99_ms,drops,errors,violations\n\
             50,50.0,120.0,360.0,480.1,12.3,0,1,0\n\
             100,81.2,2000.0,6000.0,8000.1,12.3,0,1,0\n"
        );
    }

    #[test]
    fn axis_labels_read_in_ms_or_s() {
        assert_eq!(label_ms(250.0), "250ms");
        assert_eq!(label_ms(0.5), "0.5ms");
        assert_eq!(label_ms(2000.0), "2s");
        assert_eq!(label_ms(1500.0), "1.5s");
    }

    #[test]
    fn csv_of_no_steps_is_the_header() {
        assert_eq!(csv(&[]).lines().count(), 1);
    }

    #[test]
    fn the_chart_is_an_svg_with_the_three_percentiles_and_offered_rates() {
        let svg = chart_svg(&[row(50.0, 50.0, 100), row(150.0, 120.0, 4_000)], "test").unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..80.min(svg.len())]);
        for text in [
            "p50",
            "p99",
            "p99.9",
            "50/s offered",
            "150/s offered",
            "test",
        ] {
            assert!(svg.contains(text), "{text} missing");
        }
        assert!(svg.contains("<polyline"), "no line drawn");
    }
}
