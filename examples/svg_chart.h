// A line chart written as a self-contained SVG file (axes with ticks and labels, grid, legend): enough for
// train_tiny_gpt's loss curves without a plotting dependency. A helper of the example programs, not part of
// the library's API (header-only: every examples/*.cpp is a program of its own).
//
// Coordinates: the plot frame is the chart minus its margins; an axis runs from a "nice" lower to upper
// bound (nice_axis: steps of 1, 2 or 5 times a power of ten covering the data), mapped linearly onto the
// frame, y growing upwards. A non-finite value (a diverged loss) is not plotted: the line breaks there and
// the legend says how many points were left out.
#pragma once
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <string>
#include <vector>

#include "flexgrad/tensor/error.h"
#include "examples/xml_escape.h"

namespace fg::chart {

using examples::xml_escape;

struct Series {
  std::string name{};
  std::string color{};        // any SVG colour ("#1f77b4")
  std::vector<double> x{}, y{};  // same length
  bool markers = false;       // a dot at every point (sparse series, e.g. evaluations)
};

struct LineChart {
  // Members default-initialised so that designated initialisers may leave any out.
  std::string title{}, x_label{}, y_label{};
  std::vector<Series> series{};
  double width = 900, height = 560;
  double margin_left = 72, margin_right = 24, margin_top = 44, margin_bottom = 56;
  int target_ticks = 5;  // about this many intervals per axis
};

struct Axis {
  double lo = 0, hi = 1, step = 1;
  std::vector<double> ticks;  // lo, lo + step, ..., hi
  int decimals = 0;           // tick labels print this many decimals (enough for step)
};

// The axis covering [min, max] in about `target` intervals of 1, 2 or 5 times a power of ten (the one
// nearest to (max - min) / target), its bounds multiples of the step. min == max is widened by 10% of |min| (by 1 at 0) so the axis has a length.
inline Axis nice_axis(double min, double max, int target = 5) {
  FG_CHECK(std::isfinite(min) && std::isfinite(max) && min <= max, ValueError,
           "nice_axis: need finite min <= max, got [{}, {}]", min, max);
  FG_CHECK(target >= 1, ValueError, "nice_axis: target must be >= 1, got {}", target);
  if (min == max) {
    const double d = min == 0 ? 1.0 : std::abs(min) * 0.1;
    min -= d;
    max += d;
  }
  const double raw = (max - min) / target;
  const double mag = std::pow(10.0, std::floor(std::log10(raw)));
  const double norm = raw / mag;
  Axis a;
  a.step = (norm < 1.5 ? 1 : norm < 3 ? 2 : norm < 7 ? 5 : 10) * mag;  // the nearest of 1, 2, 5, 10 (Heckbert)
  // The bounds are the step multiples at or beyond the data; the 1e-9 keeps rounding noise in min / step
  // (1.8 / 0.1 = 17.999...) from adding a whole step.
  a.lo = std::floor(min / a.step + 1e-9) * a.step;
  a.hi = std::ceil(max / a.step - 1e-9) * a.step;
  const auto n = static_cast<int64_t>(std::llround((a.hi - a.lo) / a.step));
  for (int64_t i = 0; i <= n; ++i) a.ticks.push_back(a.lo + static_cast<double>(i) * a.step);
  a.decimals = std::max(0, static_cast<int>(-std::floor(std::log10(a.step) + 1e-9)));
  return a;
}

inline std::string render_svg(const LineChart& c) {
  FG_CHECK(!c.series.empty(), ValueError, "render_svg: chart '{}' has no series", c.title);
  const double fl = c.margin_left, ft = c.margin_top, fw = c.width - c.margin_left - c.margin_right,
               fh = c.height - c.margin_top - c.margin_bottom;
  FG_CHECK(fw > 0 && fh > 0, ValueError, "render_svg: margins leave no plot area in {}x{}", c.width, c.height);
  double xmin = INFINITY, xmax = -INFINITY, ymin = INFINITY, ymax = -INFINITY;
  std::vector<int64_t> skipped;
  for (const Series& s : c.series) {
    FG_CHECK(s.x.size() == s.y.size(), ValueError, "render_svg: series '{}' has {} x values and {} y values", s.name,
             s.x.size(), s.y.size());
    int64_t bad = 0;
    for (size_t i = 0; i < s.x.size(); ++i) {
      if (!std::isfinite(s.x[i]) || !std::isfinite(s.y[i])) {
        ++bad;
        continue;
      }
      xmin = std::min(xmin, s.x[i]), xmax = std::max(xmax, s.x[i]);
      ymin = std::min(ymin, s.y[i]), ymax = std::max(ymax, s.y[i]);
    }
    skipped.push_back(bad);
  }
  FG_CHECK(xmin <= xmax, ValueError, "render_svg: chart '{}' has no finite point to plot", c.title);
  const Axis ax = nice_axis(xmin, xmax, c.target_ticks), ay = nice_axis(ymin, ymax, c.target_ticks);
  auto px = [&](double x) { return fl + (x - ax.lo) / (ax.hi - ax.lo) * fw; };
  auto py = [&](double y) { return ft + fh - (y - ay.lo) / (ay.hi - ay.lo) * fh; };

  std::string o = fmt::format(
      "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{0}\" height=\"{1}\" viewBox=\"0 0 {0} {1}\" "
      "font-family=\"sans-serif\" font-size=\"13\">\n"
      "<rect width=\"{0}\" height=\"{1}\" fill=\"white\"/>\n"
      "<text x=\"{2:.2f}\" y=\"26\" text-anchor=\"middle\" font-size=\"16\">{3}</text>\n",
      c.width, c.height, fl + fw / 2, xml_escape(c.title));
  // Grid and ticks: x ticks below the frame, y ticks left of it.
  for (double t : ax.ticks)
    o += fmt::format(
        "<line x1=\"{0:.2f}\" y1=\"{1:.2f}\" x2=\"{0:.2f}\" y2=\"{2:.2f}\" stroke=\"#e0e0e0\"/>"
        "<line x1=\"{0:.2f}\" y1=\"{2:.2f}\" x2=\"{0:.2f}\" y2=\"{3:.2f}\" stroke=\"black\"/>"
        "<text x=\"{0:.2f}\" y=\"{4:.2f}\" text-anchor=\"middle\">{5:.{6}f}</text>\n",
        px(t), ft, ft + fh, ft + fh + 5, ft + fh + 20, t, ax.decimals);
  for (double t : ay.ticks)
    o += fmt::format(
        "<line x1=\"{0:.2f}\" y1=\"{1:.2f}\" x2=\"{2:.2f}\" y2=\"{1:.2f}\" stroke=\"#e0e0e0\"/>"
        "<line x1=\"{3:.2f}\" y1=\"{1:.2f}\" x2=\"{0:.2f}\" y2=\"{1:.2f}\" stroke=\"black\"/>"
        "<text x=\"{4:.2f}\" y=\"{1:.2f}\" text-anchor=\"end\" dominant-baseline=\"middle\">{5:.{6}f}</text>\n",
        fl, py(t), fl + fw, fl - 5, fl - 8, t, ay.decimals);
  o += fmt::format("<rect x=\"{:.2f}\" y=\"{:.2f}\" width=\"{:.2f}\" height=\"{:.2f}\" fill=\"none\" stroke=\"black\"/>\n",
                   fl, ft, fw, fh);
  o += fmt::format("<text x=\"{:.2f}\" y=\"{:.2f}\" text-anchor=\"middle\">{}</text>\n", fl + fw / 2, c.height - 12,
                   xml_escape(c.x_label));
  o += fmt::format("<text transform=\"translate(18 {:.2f}) rotate(-90)\" text-anchor=\"middle\">{}</text>\n",
                   ft + fh / 2, xml_escape(c.y_label));
  // The curves: one polyline per run of finite points.
  for (const Series& s : c.series) {
    std::string pts;
    auto flush = [&] {
      if (!pts.empty())
        o += fmt::format("<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"1.5\" points=\"{}\"/>\n",
                         xml_escape(s.color), pts);
      pts.clear();
    };
    for (size_t i = 0; i < s.x.size(); ++i) {
      if (!std::isfinite(s.x[i]) || !std::isfinite(s.y[i])) {
        flush();
        continue;
      }
      pts += fmt::format("{}{:.2f},{:.2f}", pts.empty() ? "" : " ", px(s.x[i]), py(s.y[i]));
      if (s.markers)
        o += fmt::format("<circle cx=\"{:.2f}\" cy=\"{:.2f}\" r=\"3\" fill=\"{}\"/>\n", px(s.x[i]), py(s.y[i]),
                         xml_escape(s.color));
    }
    flush();
  }
  // Legend in the frame's top-right corner.
  size_t longest = 0;
  std::vector<std::string> names;
  for (size_t i = 0; i < c.series.size(); ++i) {
    names.push_back(c.series[i].name +
                    (skipped[i] ? fmt::format(" ({} non-finite point{} not shown)", skipped[i], skipped[i] > 1 ? "s" : "")
                                : ""));
    longest = std::max(longest, names.back().size());
  }
  const double lw = 44 + 7.5 * static_cast<double>(longest), lh = 8 + 20 * static_cast<double>(names.size());
  const double lx = fl + fw - lw - 10, ly = ft + 10;
  o += fmt::format("<rect x=\"{:.2f}\" y=\"{:.2f}\" width=\"{:.2f}\" height=\"{:.2f}\" fill=\"white\" "
                   "fill-opacity=\"0.9\" stroke=\"#999999\"/>\n",
                   lx, ly, lw, lh);
  for (size_t i = 0; i < names.size(); ++i) {
    const double y = ly + 14 + 20 * static_cast<double>(i);
    o += fmt::format(
        "<line x1=\"{0:.2f}\" y1=\"{1:.2f}\" x2=\"{2:.2f}\" y2=\"{1:.2f}\" stroke=\"{3}\" stroke-width=\"2\"/>"
        "<text x=\"{4:.2f}\" y=\"{1:.2f}\" dominant-baseline=\"middle\">{5}</text>\n",
        lx + 8, y, lx + 32, xml_escape(c.series[i].color), lx + 38, xml_escape(names[i]));
  }
  o += "</svg>\n";
  return o;
}

// Writes render_svg(chart) to path; IOError when the file cannot be written.
inline void write_svg(const LineChart& chart, const std::string& path) {
  const std::string text = render_svg(chart);
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f << text;
  f.flush();
  FG_CHECK(f.good(), IOError, "write_svg: cannot write {}", path);
}

}  // namespace fg::chart
