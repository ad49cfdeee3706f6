// Schedules and phi_t, against the formulas of docs/algorithms.md and values of the reference code's formulas
// (its warm-up + cosine schedule; its TVLARS factor at commit 89c3291).
#include <largebatch/optim/schedule.h>

#include <gtest/gtest.h>

#include <cmath>
#include <stdexcept>

namespace lo = largebatch::optim;

namespace {

lo::LrSchedule warmup_schedule(int64_t batch, int64_t steps_per_epoch) {
  lo::ScheduleOptions o;
  o.kind = lo::ScheduleKind::kWarmupCosine;
  o.lr = 1.0;
  o.scaling = lo::LrScaling::kLinear;
  o.batch_size = batch;
  o.warmup_steps = 20 * steps_per_epoch;
  o.total_steps = 100 * steps_per_epoch;
  o.final_ratio = 0.001;
  return lo::LrSchedule(o);
}

TEST(WarmupCosine, MatchesReferenceVectorsAtB512) {
  const auto s = warmup_schedule(512, 98);
  EXPECT_EQ(s.at(0), 0.0);  // starts at exactly 0
  EXPECT_NEAR(s.at(1), 0.00102, 5e-6);
  EXPECT_NEAR(s.at(10 * 98), 1.0, 1e-12);
  EXPECT_NEAR(s.at(20 * 98), 2.0, 1e-12);
  EXPECT_NEAR(s.at(60 * 98), 1.001, 1e-12);
  EXPECT_NEAR(s.at(100 * 98 - 1), 0.002, 1e-6);
}

TEST(WarmupCosine, MatchesReferenceVectorsAtB16384) {
  const auto s = warmup_schedule(16384, 4);
  EXPECT_DOUBLE_EQ(s.peak(), 64.0);
  EXPECT_EQ(s.at(0), 0.0);
  EXPECT_NEAR(s.at(1), 0.8, 1e-12);
  EXPECT_NEAR(s.at(40), 32.0, 1e-12);
  EXPECT_NEAR(s.at(80), 64.0, 1e-12);
  EXPECT_NEAR(s.at(240), 32.032, 1e-9);
  EXPECT_NEAR(s.at(399), 0.0655, 5e-5);
  EXPECT_NEAR(s.at(400), 0.064, 1e-12);  // T: exactly final_ratio * peak
}

TEST(Schedules, ConstantCosineAndScalingRules) {
  lo::ScheduleOptions o;
  o.lr = 0.5;
  o.total_steps = 10;
  o.batch_size = 1024;
  EXPECT_DOUBLE_EQ(lo::LrSchedule(o).at(7), 0.5);  // constant, no scaling
  o.scaling = lo::LrScaling::kLinear;
  EXPECT_DOUBLE_EQ(lo::LrSchedule(o).peak(), 2.0);
  o.scaling = lo::LrScaling::kSqrt;
  EXPECT_DOUBLE_EQ(lo::LrSchedule(o).peak(), 1.0);
  o.scaling = lo::LrScaling::kNone;
  o.kind = lo::ScheduleKind::kCosine;
  o.final_ratio = 0.1;
  const lo::LrSchedule cosine(o);
  EXPECT_DOUBLE_EQ(cosine.at(0), 0.5);          // no warm-up
  EXPECT_NEAR(cosine.at(5), 0.5 * 0.55, 1e-15);  // half way: mean of peak and floor
  EXPECT_NEAR(cosine.at(10), 0.05, 1e-15);
  EXPECT_NEAR(cosine.at(50), 0.05, 1e-15);  // past T it stays at the floor
}

// MLPerf's LARS schedule: warm-up, then end + (peak - end) (1 - p)^power; hand-computed at a few steps.
TEST(Schedules, PolyMatchesItsFormula) {
  lo::ScheduleOptions o;
  o.kind = lo::ScheduleKind::kPoly;
  o.lr = 2.0;
  o.warmup_steps = 10;
  o.total_steps = 110;
  o.final_ratio = 0.01;
  o.poly_power = 2.0;
  const lo::LrSchedule s(o);
  EXPECT_EQ(s.at(0), 0.0);
  EXPECT_DOUBLE_EQ(s.at(5), 1.0);
  EXPECT_DOUBLE_EQ(s.at(10), 2.0);
  EXPECT_DOUBLE_EQ(s.at(60), 0.02 + (2.0 - 0.02) * 0.25);  // p = 1/2
  EXPECT_DOUBLE_EQ(s.at(85), 0.02 + (2.0 - 0.02) * 0.0625);  // p = 3/4
  EXPECT_DOUBLE_EQ(s.at(110), 0.02);
  EXPECT_DOUBLE_EQ(s.at(500), 0.02);  // past the end: the end value
  o.poly_power = 1.0;
  EXPECT_DOUBLE_EQ(lo::LrSchedule(o).at(60), 0.02 + 1.98 * 0.5);
}

TEST(Schedules, StepMatchesItsFormula) {
  lo::ScheduleOptions o;
  o.kind = lo::ScheduleKind::kStep;
  o.lr = 1.0;
  o.warmup_steps = 4;
  o.total_steps = 100;
  o.milestones = {30, 60};
  o.step_gamma = 0.1;
  const lo::LrSchedule s(o);
  EXPECT_DOUBLE_EQ(s.at(2), 0.5);
  EXPECT_DOUBLE_EQ(s.at(4), 1.0);
  EXPECT_DOUBLE_EQ(s.at(29), 1.0);
  EXPECT_DOUBLE_EQ(s.at(30), 0.1);
  EXPECT_DOUBLE_EQ(s.at(59), 0.1);
  EXPECT_DOUBLE_EQ(s.at(60), 1.0 * 0.1 * 0.1);
  EXPECT_DOUBLE_EQ(s.at(99), 1.0 * 0.1 * 0.1);
  EXPECT_TRUE(lo::has_warmup(lo::ScheduleKind::kStep));
  EXPECT_TRUE(lo::has_warmup(lo::ScheduleKind::kPoly));
  EXPECT_FALSE(lo::has_warmup(lo::ScheduleKind::kCosine));
  o.milestones = {60, 30};
  EXPECT_THROW(lo::LrSchedule{o}, std::invalid_argument);
  o.milestones = {30};
  o.step_gamma = 0;
  EXPECT_THROW(lo::LrSchedule{o}, std::invalid_argument);
  o.step_gamma = 0.5;
  o.kind = lo::ScheduleKind::kPoly;
  o.poly_power = 0;
  EXPECT_THROW(lo::LrSchedule{o}, std::invalid_argument);
}

TEST(Schedules, NamesRoundTrip) {
  for (auto k : {lo::ScheduleKind::kConstant, lo::ScheduleKind::kCosine, lo::ScheduleKind::kWarmupCosine,
                 lo::ScheduleKind::kPoly, lo::ScheduleKind::kStep})
    EXPECT_EQ(lo::parse_schedule_kind(lo::to_string(k)), k);
  for (auto s : {lo::LrScaling::kNone, lo::LrScaling::kLinear, lo::LrScaling::kSqrt})
    EXPECT_EQ(lo::parse_lr_scaling(lo::to_string(s)), s);
  EXPECT_THROW(lo::parse_schedule_kind("exponential"), std::invalid_argument);
  EXPECT_THROW(lo::parse_lr_scaling("cube"), std::invalid_argument);
}

void expect_invalid(const lo::ScheduleOptions& o, const std::string& option) {
  try {
    lo::LrSchedule s(o);
    ADD_FAILURE() << "no exception for " << option;
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find(option), std::string::npos) << e.what();
  }
}

TEST(Schedules, InvalidOptionsAreNamed) {
  lo::ScheduleOptions o;
  auto bad = o;
  bad.lr = -1;
  expect_invalid(bad, "lr");
  bad = o;
  bad.total_steps = 0;
  expect_invalid(bad, "total_steps");
  bad = o;
  bad.kind = lo::ScheduleKind::kWarmupCosine;
  bad.warmup_steps = 5;
  bad.total_steps = 4;
  expect_invalid(bad, "warmup_steps");
  bad = o;
  bad.final_ratio = 2;
  expect_invalid(bad, "final_ratio");
  bad = o;
  bad.batch_size = 0;
  expect_invalid(bad, "batch_size");
}

TEST(Phi, PaperFormIsAShiftedSigmoid) {
  const lo::TimeVarying tv{1.0, 0.01, 500.0, 0.004};
  for (int64_t t : {0, 100, 500, 900, 5000}) {
    const double sigmoid = 1.0 / (1.0 + std::exp(0.01 * (t - 500.0)));
    EXPECT_NEAR(lo::tv_phi(tv, t), sigmoid + 0.004, 1e-15);
  }
  EXPECT_NEAR(lo::tv_phi(tv, 500), 0.504, 1e-15);  // phi(d_e) = 1/(alpha+1) + gamma_min
}

TEST(Phi, ReferenceCodeTableValues) {
  // Reference code at commit 89c3291 (docs/algorithms.md): alpha 0.1, d_e = -1, gamma_min 0. CIFAR-10 on 4 workers,
  // 100 epochs: B = 512 (T = 9800), lambda = 1e-3.
  const lo::TimeVarying head{0.1, 1e-3, -1.0, 0.0};
  EXPECT_NEAR(lo::tv_phi(head, 0), 1.0 / (0.1 + std::exp(1e-3)), 1e-15);
  EXPECT_NEAR(lo::tv_phi(head, 0), 0.909, 1e-3);
  EXPECT_NEAR(lo::tv_phi(head, 4900), 7.4e-3, 1e-4);
  EXPECT_NEAR(lo::tv_phi(head, 9799), 5.6e-5, 1e-6);
  const lo::TimeVarying b4096{0.1, 1e-4, -1.0, 0.0};  // B = 4096 (T = 1300), lambda = 1e-4
  EXPECT_NEAR(lo::tv_phi(b4096, 650), 0.857, 1e-3);
  EXPECT_NEAR(lo::tv_phi(b4096, 1299), 0.807, 1e-3);
}

TEST(Phi, LargeExponentsReachTheFloorWithoutNaN) {
  const lo::TimeVarying tv{1.0, 5e-2, 0.0, 0.016};
  EXPECT_EQ(lo::tv_phi(tv, 1000000), 0.016);
  EXPECT_TRUE(std::isfinite(lo::tv_phi(tv, INT64_C(1) << 40)));
}

TEST(Phi, InvalidParametersAreNamed) {
  auto message = [](const lo::TimeVarying& tv) {
    try {
      lo::validate(tv);
    } catch (const std::invalid_argument& e) {
      return std::string(e.what());
    }
    return std::string("no exception");
  };
  EXPECT_NE(message({0.0, 1e-3, 0, 0}).find("alpha = 0"), std::string::npos);
  EXPECT_NE(message({1.0, -1e-3, 0, 0}).find("lambda = -0.001"), std::string::npos);
  EXPECT_NE(message({1.0, 1e-3, 0, -1}).find("gamma_min = -1"), std::string::npos);
  EXPECT_NE(message({1.0, 1e-3, NAN, 0}).find("delay"), std::string::npos);
}

}  // namespace
