//! `bench.png`: one row per MTU. Left, every speed figure of every
//! contender relative to direct TCP (1.0 = the kernel alone, higher is
//! better: latency is shown as direct's latency over the contender's).
//! Right, the forwarders' memory (PSS: a forking relay's RSS counts its
//! shared pages once per process) idle and with the idle connections open.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::{Kind, Options, Report};

/// TrueType fonts tried, in order (Debian's fonts-dejavu-core first).
const FONTS: [&str; 4] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
    "/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf",
];

/// The font the chart's text uses, if one is installed.
pub(crate) fn font() -> Option<PathBuf> {
    FONTS.iter().map(PathBuf::from).find(|path| path.is_file())
}

/// Registers [`font`] with plotters once; `false` if there is none (the
/// chart is then drawn without text).
fn register_font() -> bool {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    *REGISTERED.get_or_init(|| {
        let Some(bytes) = font().and_then(|path| std::fs::read(path).ok()) else {
            return false;
        };
        // Once per process: plotters keeps fonts for the program's life.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok()
    })
}

/// The speed figures on the chart, with their short labels.
const SPEED: [(&str, &str); 9] = [
    ("throughput_1_up", "1 stream A→B"),
    ("throughput_1_down", "1 stream B→A"),
    ("throughput_8_up", "8 streams A→B"),
    ("throughput_8_down", "8 streams B→A"),
    ("latency_64_p50", "64 B p50"),
    ("latency_64_p99", "64 B p99"),
    ("latency_16k_p50", "16 KiB p50"),
    ("latency_16k_p99", "16 KiB p99"),
    ("connect_rate", "conn/s"),
];

fn color(kind: Kind) -> RGBColor {
    match kind {
        Kind::Direct => RGBColor(127, 127, 127),
        Kind::Meshtun => RGBColor(214, 39, 40),
        Kind::MeshtunOneShard => RGBColor(240, 140, 140),
        Kind::Stunnel => RGBColor(31, 119, 180),
        Kind::Ssh => RGBColor(44, 160, 44),
        Kind::Spiped => RGBColor(148, 103, 189),
        Kind::Socat => RGBColor(255, 127, 14),
    }
}

/// The category a tick at `x` labels: only whole, non-negative positions
/// (the bar groups) have one.
fn category(x: f64) -> Option<usize> {
    let index = x.round();
    ((x - index).abs() <= 1e-6 && index >= 0.0).then_some(index as usize)
}

fn e<E: std::fmt::Debug>(error: E) -> String {
    format!("{error:?}")
}

/// Draws the chart into `path`; `Ok(Some(note))` when it lacks something
/// (no font: no text).
pub(crate) fn draw(
    path: &Path,
    report: &Report,
    options: &Options,
) -> Result<Option<String>, String> {
    let text = register_font();
    let rows = u32::try_from(options.mtus.len().max(1)).unwrap_or(1);
    let root = BitMapBackend::new(path, (1800, 60 + 460 * rows)).into_drawing_area();
    root.fill(&WHITE).map_err(e)?;
    let (top, body) = root.split_vertically(60);
    if text {
        top.draw_text(
            "meshtun-bench: A's loopback → forwarder on A → link → forwarder on B → B's loopback",
            &("sans-serif", 24).into_font().color(&BLACK),
            (20, 18),
        )
        .map_err(e)?;
    }
    let kinds: Vec<Kind> = report.ran.iter().map(|(kind, _)| *kind).collect();
    let panels = body.split_evenly((options.mtus.len().max(1), 1));
    for (row, &mtu) in panels.iter().zip(&options.mtus) {
        let (left, right) = row.split_horizontally(1250);
        speed_panel(&left, report, &kinds, mtu, text)?;
        memory_panel(&right, report, &kinds, mtu, options.idle_connections, text)?;
    }
    root.present().map_err(e)?;
    Ok((!text).then(|| {
        "no TrueType font found (apt-get install fonts-dejavu-core): chart drawn without text"
            .to_owned()
    }))
}

fn speed_panel(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    report: &Report,
    kinds: &[Kind],
    mtu: u32,
    text: bool,
) -> Result<(), String> {
    // Relative to direct TCP when it ran, else to meshtun.
    let base = if kinds.contains(&Kind::Direct) {
        Kind::Direct
    } else {
        Kind::Meshtun
    };
    let series: Vec<Kind> = kinds.iter().copied().filter(|kind| *kind != base).collect();
    let relative = |kind: Kind, id: &str| -> Option<f64> {
        let higher_is_better = crate::MEASUREMENTS
            .iter()
            .find(|m| m.id == id)
            .is_some_and(|m| m.higher_is_better);
        let value = report.value(mtu, kind, id)?;
        let base = report.value(mtu, base, id)?;
        if value <= 0.0 || base <= 0.0 {
            return None;
        }
        Some(if higher_is_better {
            value / base
        } else {
            base / value
        })
    };
    let top = series
        .iter()
        .flat_map(|kind| SPEED.iter().filter_map(|(id, _)| relative(*kind, id)))
        .fold(0.0f64, f64::max);
    // Scaled to the bars (the 1.0 line shows when a bar gets near it).
    let ymax = (top * 1.15).clamp(0.1, 3.0);
    let groups = SPEED.len() as f64;
    let mut builder = ChartBuilder::on(area);
    builder.margin(12);
    if text {
        builder
            .caption(
                format!(
                    "MTU {mtu}: speed relative to {} TCP (1.0 = {}; higher is better; latency as {} ÷ contender)",
                    base.name(),
                    base.name(),
                    base.name()
                ),
                ("sans-serif", 18),
            )
            .x_label_area_size(30)
            .y_label_area_size(50);
    }
    let mut chart = builder
        .build_cartesian_2d(-0.5f64..(groups - 0.5), 0f64..ymax)
        .map_err(e)?;
    let label_at = |x: &f64| -> String {
        category(*x)
            .and_then(|index| SPEED.get(index))
            .map(|(_, label)| (*label).to_owned())
            .unwrap_or_default()
    };
    let mut mesh = chart.configure_mesh();
    mesh.disable_x_mesh();
    if text {
        mesh.x_labels(SPEED.len())
            .x_label_formatter(&label_at)
            .y_desc(format!("× {}", base.name()))
            .label_style(("sans-serif", 14));
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw().map_err(e)?;
    let width = 0.84 / series.len().max(1) as f64;
    for (index, &kind) in series.iter().enumerate() {
        let fill = color(kind).filled();
        let bars: Vec<_> = SPEED
            .iter()
            .enumerate()
            .filter_map(|(group, (id, _))| {
                let value = relative(kind, id)?.min(ymax);
                let x0 = group as f64 - 0.42 + index as f64 * width;
                Some(Rectangle::new([(x0, 0.0), (x0 + width * 0.9, value)], fill))
            })
            .collect();
        let drawn = chart.draw_series(bars).map_err(e)?;
        if text {
            drawn.label(kind.name()).legend(move |(x, y)| {
                Rectangle::new([(x, y - 6), (x + 14, y + 6)], color(kind).filled())
            });
        }
    }
    if ymax >= 1.0 {
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(-0.5, 1.0), (groups - 0.5, 1.0)],
                BLACK.stroke_width(2),
            )))
            .map_err(e)?;
    }
    if text {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(e)?;
    }
    Ok(())
}

fn memory_panel(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    report: &Report,
    kinds: &[Kind],
    mtu: u32,
    idle_connections: usize,
    text: bool,
) -> Result<(), String> {
    let series: Vec<Kind> = kinds
        .iter()
        .copied()
        .filter(|kind| *kind != Kind::Direct)
        .collect();
    let values: Vec<(Kind, Option<f64>, Option<f64>)> = series
        .iter()
        .map(|&kind| {
            (
                kind,
                report.value(mtu, kind, "pss_idle"),
                report.value(mtu, kind, "pss_loaded"),
            )
        })
        .collect();
    let top = values
        .iter()
        .flat_map(|(_, idle, loaded)| [*idle, *loaded])
        .flatten()
        .fold(1.0f64, f64::max);
    let n = series.len().max(1) as f64;
    let mut builder = ChartBuilder::on(area);
    builder.margin(12);
    if text {
        builder
            .caption(
                format!("PSS of A+B forwarders, MiB: idle | {idle_connections} idle conns"),
                ("sans-serif", 16),
            )
            .x_label_area_size(30)
            .y_label_area_size(55);
    }
    let mut chart = builder
        .build_cartesian_2d(-0.5f64..(n - 0.5), 0f64..top * 1.15)
        .map_err(e)?;
    let names: Vec<&str> = series.iter().map(|kind| kind.name()).collect();
    let label_at = |x: &f64| -> String {
        category(*x)
            .and_then(|index| names.get(index))
            .map(|name| (*name).to_owned())
            .unwrap_or_default()
    };
    let mut mesh = chart.configure_mesh();
    mesh.disable_x_mesh();
    if text {
        mesh.x_labels(series.len())
            .x_label_formatter(&label_at)
            .label_style(("sans-serif", 14));
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw().map_err(e)?;
    for (index, (kind, idle, loaded)) in values.iter().enumerate() {
        let x = index as f64;
        let mut bars = Vec::new();
        if let Some(idle) = idle {
            bars.push((
                Rectangle::new(
                    [(x - 0.38, 0.0), (x - 0.02, *idle)],
                    color(*kind).mix(0.45).filled(),
                ),
                x - 0.2,
                *idle,
            ));
        }
        if let Some(loaded) = loaded {
            bars.push((
                Rectangle::new(
                    [(x + 0.02, 0.0), (x + 0.38, *loaded)],
                    color(*kind).filled(),
                ),
                x + 0.2,
                *loaded,
            ));
        }
        for (bar, center, value) in bars {
            chart.draw_series(std::iter::once(bar)).map_err(e)?;
            if text {
                let label = if value >= 100.0 {
                    format!("{value:.0}")
                } else {
                    format!("{value:.1}")
                };
                chart
                    .draw_series(std::iter::once(Text::new(
                        label,
                        (center - 0.15, value + top * 0.06),
                        ("sans-serif", 12).into_font(),
                    )))
                    .map_err(e)?;
            }
        }
    }
    Ok(())
}
