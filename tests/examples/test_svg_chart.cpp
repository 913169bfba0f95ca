// The SVG line chart of the example programs (examples/svg_chart.h): axis bounds and ticks, the mapping of
// data to pixels, line breaks at non-finite values, escaping and errors. Expected values are worked out by
// hand in the comments.
#include <string>

#include "examples/svg_chart.h"
#include "tests/test_util.h"

namespace {
using namespace fg;
using namespace fg::chart;

int count(const std::string& text, const std::string& what) {
  int n = 0;
  for (size_t p = text.find(what); p != std::string::npos; p = text.find(what, p + 1)) ++n;
  return n;
}

TEST(SvgChart, NiceAxisCoversTheDataInStepsOfOneTwoFive) {
  // The step is the nearest of 1, 2, 5, 10 times the raw step's power of ten (cuts at 1.5, 3 and 7).
  // [0.13, 4.2] in 5: raw step 4.07 / 5 = 0.814 -> magnitude 0.1, 8.14 -> 10 -> step 1, bounds 0..5.
  Axis a = nice_axis(0.13, 4.2, 5);
  EXPECT_DOUBLE_EQ(a.step, 1.0);
  EXPECT_DOUBLE_EQ(a.lo, 0.0);
  EXPECT_DOUBLE_EQ(a.hi, 5.0);
  EXPECT_EQ(a.ticks.size(), 6u);
  EXPECT_EQ(a.decimals, 0);
  // [2.31, 2.87]: raw 0.112 -> 1.12 -> 1 -> step 0.1; floor(23.1) = 23 -> 2.3, ceil(28.7) = 29 -> 2.9.
  a = nice_axis(2.31, 2.87, 5);
  EXPECT_NEAR(a.step, 0.1, 1e-15);
  EXPECT_NEAR(a.lo, 2.3, 1e-12);
  EXPECT_NEAR(a.hi, 2.9, 1e-12);
  ASSERT_EQ(a.ticks.size(), 7u);
  EXPECT_NEAR(a.ticks[2], 2.5, 1e-12);
  EXPECT_EQ(a.decimals, 1);
  // [0, 1000] in 4: raw 250 -> 2.5 -> 2 -> step 200, six ticks.
  a = nice_axis(0, 1000, 4);
  EXPECT_DOUBLE_EQ(a.step, 200.0);
  EXPECT_EQ(a.ticks.size(), 6u);
  // [1.77, 4.35] in 5 (a loss curve): raw 0.516 -> 5.16 -> 5 -> step 0.5, bounds 1.5..4.5.
  a = nice_axis(1.77, 4.35, 5);
  EXPECT_DOUBLE_EQ(a.step, 0.5);
  EXPECT_DOUBLE_EQ(a.lo, 1.5);
  EXPECT_DOUBLE_EQ(a.hi, 4.5);
  // One value: widened by 10% of it, [1.8, 2.2] -> raw 0.08 -> 8 -> 10 -> step 0.1, bounds 1.8..2.2
  // (1.8 / 0.1 is 17.999... in floating point: still 18 steps).
  a = nice_axis(2, 2, 5);
  EXPECT_NEAR(a.step, 0.1, 1e-15);
  EXPECT_NEAR(a.lo, 1.8, 1e-12);
  EXPECT_NEAR(a.hi, 2.2, 1e-12);
  EXPECT_EQ(a.ticks.size(), 5u);
  EXPECT_EQ(a.decimals, 1);
  // Steps below 0.1 need more decimals: [0, 0.2] in 5 -> raw 0.04 -> 4 -> 5 -> step 0.05, 2 decimals.
  a = nice_axis(0, 0.2, 5);
  EXPECT_NEAR(a.step, 0.05, 1e-15);
  EXPECT_EQ(a.decimals, 2);
}

TEST(SvgChart, NiceAxisRejectsBadBounds) {
  EXPECT_THROW_MSG(nice_axis(3, 1), ValueError, "need finite min <= max, got [3, 1]");
  EXPECT_THROW_MSG(nice_axis(0, INFINITY), ValueError, "finite");
  EXPECT_THROW_MSG(nice_axis(0, 1, 0), ValueError, "target must be >= 1, got 0");
}

TEST(SvgChart, PointsMapLinearlyOntoThePlotFrame) {
  // A 400 x 300 chart with margins left 60, right 20, top 30, bottom 50: the frame is x 60..380 (320 wide),
  // y 30..250 (220 high). Axes: x [0, 10] step 2, y [0, 5] step 1 (raw steps 2 and 1).
  // (0, 0) -> (60, 250); (5, 2.5) -> (60 + 160, 250 - 110) = (220, 140); (10, 5) -> (380, 30).
  LineChart c{.title = "t", .x_label = "x", .y_label = "y",
              .series = {{.name = "s", .color = "red", .x = {0, 5, 10}, .y = {0, 2.5, 5}}},
              .width = 400, .height = 300, .margin_left = 60, .margin_right = 20, .margin_top = 30,
              .margin_bottom = 50};
  const std::string svg = render_svg(c);
  EXPECT_THAT(svg, ::testing::HasSubstr("points=\"60.00,250.00 220.00,140.00 380.00,30.00\""));
  EXPECT_EQ(count(svg, "<polyline"), 1);
  // x ticks 0, 2, ..., 10 at 60 + 32 i; the one at 4 is x = 188, labelled below the frame (y 250 + 20).
  EXPECT_THAT(svg, ::testing::HasSubstr("<text x=\"188.00\" y=\"270.00\" text-anchor=\"middle\">4</text>"));
  // y ticks 0..5 at 250 - 44 i; the one at 3 is y = 118, labelled left of the frame (x 60 - 8).
  EXPECT_THAT(svg, ::testing::HasSubstr("<text x=\"52.00\" y=\"118.00\" text-anchor=\"end\""));
  EXPECT_EQ(count(svg, "text-anchor=\"end\""), 6);
  EXPECT_THAT(svg, ::testing::HasSubstr("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"400\" height=\"300\""));
  EXPECT_EQ(svg.substr(svg.size() - 7), "</svg>\n");
}

TEST(SvgChart, NonFiniteValuesBreakTheLineAndAreCountedInTheLegend) {
  // The NaN at x = 2 splits the series into two polylines; the axes come from the finite points only
  // (x [0, 4] step 1 over a 100-wide frame, y [0, 4] step 1 over a 100-high one).
  LineChart c{.title = "t", .series = {{.name = "loss", .color = "blue", .x = {0, 1, 2, 3, 4},
                                        .y = {0, 1, NAN, 3, 4}, .markers = true}},
              .width = 120, .height = 120, .margin_left = 10, .margin_right = 10, .margin_top = 10,
              .margin_bottom = 10};
  const std::string svg = render_svg(c);
  EXPECT_EQ(count(svg, "<polyline"), 2);
  EXPECT_THAT(svg, ::testing::HasSubstr("points=\"10.00,110.00 35.00,85.00\""));
  EXPECT_THAT(svg, ::testing::HasSubstr("points=\"85.00,35.00 110.00,10.00\""));
  EXPECT_EQ(count(svg, "<circle"), 4);
  EXPECT_THAT(svg, ::testing::HasSubstr("loss (1 non-finite point not shown)"));
}

TEST(SvgChart, TextIsEscaped) {
  LineChart c{.title = "a < b & \"c\"", .series = {{.name = "x>y", .color = "red", .x = {0, 1}, .y = {0, 1}}}};
  const std::string svg = render_svg(c);
  EXPECT_THAT(svg, ::testing::HasSubstr(">a &lt; b &amp; &quot;c&quot;</text>"));
  EXPECT_THAT(svg, ::testing::HasSubstr(">x&gt;y</text>"));
}

TEST(SvgChart, RejectsChartsItCannotDraw) {
  EXPECT_THROW_MSG(render_svg(LineChart{.title = "empty"}), ValueError, "chart 'empty' has no series");
  LineChart uneven{.series = {{.name = "s", .x = {0, 1}, .y = {0}}}};
  EXPECT_THROW_MSG(render_svg(uneven), ValueError, "series 's' has 2 x values and 1 y values");
  LineChart nothing{.title = "nan", .series = {{.name = "s", .x = {0}, .y = {NAN}}}};
  EXPECT_THROW_MSG(render_svg(nothing), ValueError, "chart 'nan' has no finite point to plot");
  LineChart tiny{.series = {{.name = "s", .x = {0, 1}, .y = {0, 1}}}, .width = 50};
  EXPECT_THROW_MSG(render_svg(tiny), ValueError, "margins leave no plot area in 50x560");
  EXPECT_THROW_MSG(write_svg(LineChart{.series = {{.name = "s", .x = {0, 1}, .y = {0, 1}}}},
                             "/nonexistent-dir/loss.svg"),
                   IOError, "cannot write /nonexistent-dir/loss.svg");
}

}  // namespace
