// Data parallelism: the launch environment read from torchrun's, Open MPI's or Slurm's variables.
#include <largebatch/dist/dist.h>

#include <gtest/gtest.h>

#include <cstdlib>
#include <initializer_list>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace {
// Sets variables for one test and restores the previous environment afterwards.
class ScopedEnv {
 public:
  ScopedEnv(std::initializer_list<std::pair<const char*, const char*>> vars) {
    for (const char* name : kAll) {
      const char* v = std::getenv(name);
      saved_.emplace_back(name, v ? std::optional<std::string>(v) : std::nullopt);
      unsetenv(name);
    }
    for (const auto& [k, v] : vars) setenv(k, v, 1);
  }
  ~ScopedEnv() {
    for (const auto& [k, v] : saved_) {
      if (v) setenv(k.c_str(), v->c_str(), 1);
      else unsetenv(k.c_str());
    }
  }

 private:
  static constexpr const char* kAll[] = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                                         "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
                                         "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"};
  std::vector<std::pair<std::string, std::optional<std::string>>> saved_;
};

void expect_env_error(std::initializer_list<std::pair<const char*, const char*>> vars, const std::string& needle) {
  ScopedEnv env(vars);
  try {
    largebatch::dist::launch_env_from_environment();
    ADD_FAILURE() << "accepted; expected an error naming " << needle;
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}
}  // namespace

TEST(LaunchEnv, TorchrunOpenMpiSlurmAndNone) {
  {
    ScopedEnv env({});
    const auto e = largebatch::dist::launch_env_from_environment();
    EXPECT_EQ(e.world, 1);
    EXPECT_FALSE(e.distributed());
    EXPECT_EQ(e.source, "none");
  }
  {
    ScopedEnv env({{"RANK", "3"}, {"WORLD_SIZE", "8"}, {"LOCAL_RANK", "1"}, {"MASTER_ADDR", "10.0.0.7"},
                   {"MASTER_PORT", "29611"}, {"SLURM_PROCID", "5"}, {"SLURM_NTASKS", "9"}});
    const auto e = largebatch::dist::launch_env_from_environment();  // torchrun's variables win
    EXPECT_EQ(e.source, "torchrun");
    EXPECT_EQ(e.rank, 3);
    EXPECT_EQ(e.world, 8);
    EXPECT_EQ(e.local_rank, 1);
    EXPECT_EQ(e.master_addr, "10.0.0.7");
    EXPECT_EQ(e.master_port, 29611);
  }
  {
    ScopedEnv env({{"OMPI_COMM_WORLD_RANK", "2"}, {"OMPI_COMM_WORLD_SIZE", "4"}, {"OMPI_COMM_WORLD_LOCAL_RANK", "0"}});
    const auto e = largebatch::dist::launch_env_from_environment();
    EXPECT_EQ(e.source, "openmpi");
    EXPECT_EQ(e.rank, 2);
    EXPECT_EQ(e.world, 4);
    EXPECT_EQ(e.local_rank, 0);
    EXPECT_EQ(e.master_port, 29500);
  }
  {
    ScopedEnv env({{"SLURM_PROCID", "1"}, {"SLURM_NTASKS", "2"}});
    const auto e = largebatch::dist::launch_env_from_environment();
    EXPECT_EQ(e.source, "slurm");
    EXPECT_EQ(e.rank, 1);
    EXPECT_EQ(e.local_rank, 1);  // no SLURM_LOCALID: the global rank
    EXPECT_TRUE(e.distributed());
  }
}

TEST(LaunchEnv, MalformedValuesNameTheVariable) {
  expect_env_error({{"RANK", "x"}, {"WORLD_SIZE", "2"}}, "RANK='x'");
  expect_env_error({{"RANK", "0"}}, "WORLD_SIZE is missing");
  expect_env_error({{"RANK", "2"}, {"WORLD_SIZE", "2"}}, "RANK=2 is not below WORLD_SIZE=2");
  expect_env_error({{"RANK", "0"}, {"WORLD_SIZE", "0"}}, "WORLD_SIZE='0'");
  expect_env_error({{"MASTER_PORT", "70000"}}, "MASTER_PORT=70000");
  expect_env_error({{"MASTER_PORT", "80a"}}, "MASTER_PORT='80a'");
  expect_env_error({{"SLURM_NTASKS", "2"}}, "SLURM_PROCID is missing");
}
