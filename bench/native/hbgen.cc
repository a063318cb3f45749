// Simulated agents for bench.agent_heartbeats, in C++ so that the load generator costs the
// two cores it shares with the control plane as little as it can.
//
// A Python generator spends about 820 MiB and most of a core on 25,000 agents' streams
// (grpc.aio: one task, one call object and one coroutine per agent); 100,000 of them left the
// control plane too little CPU to take the streams up. This program does what each of those
// agents does on the wire, the same messages on the same RPCs:
//
//   1. Join with the bootstrap token (at most 200 in flight), keeping each agent's id and
//      credential;
//   2. open one Heartbeats client stream per agent with that identity as metadata;
//   3. every 10 ms, write the next heartbeat of the agents whose turn it is, so each agent
//      beats once per --interval and the fleet offers agents / interval beats a second;
//   4. a stream the server ends with CANCELLED, RESOURCE_EXHAUSTED or UNAVAILABLE (a hub
//      shedding load) is opened again, as an agent does; any other end fails the run.
//
// It runs until its standard input closes (the benchmark's stop) or --max-seconds pass, then
// prints one JSON object ({"sent", "reopened", "skipped", "failed_writes", "join_s", "cpu_s",
// "error"}: beats written, streams opened again, turns skipped because the agent's previous
// beat was still being written, writes that failed, how long the joins took, this process's
// CPU seconds, and why the run failed or "") and exits; the kernel
// closes its connections, which the hub sees as every agent's stream ending.
//
// Built by bench.native (protoc + g++ against Debian's libgrpc++-dev); not part of the
// product, which speaks to agents only through Python's grpcio.

#include <grpcpp/grpcpp.h>
#include <sys/resource.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "edgeplane_proto/agent/v1/agent.grpc.pb.h"

namespace pb = edgeplane::agent::v1;
using Clock = std::chrono::steady_clock;

namespace {

struct Options {
  std::string target;
  std::string token = "bench-token";
  long agents = 1000;
  long first_site = 0;
  double interval_s = 10.0;
  double max_seconds = 900.0;
  int channels = 0;  // 0: one per 100 agents, at least 8
};

struct Agent {
  std::string site;
  std::string agent_id;
  std::string credential;
  uint64_t seq = 0;
};

class Fleet;

// One agent's heartbeat stream. Writes are started by the ticker thread, outside the
// reactor's own callbacks, so the reactor holds itself open (AddHold) until a write fails or
// the run ends: only then may OnDone run and the stream's status be read.
class Stream : public grpc::ClientWriteReactor<pb::Heartbeat> {
 public:
  enum State { kIdle, kWriting, kDead };

  Stream(Fleet* fleet, long index, pb::AgentControl::Stub* stub);
  // Starts this agent's next heartbeat unless its previous one is still being written.
  bool Beat();
  void OnWriteDone(bool ok) override;
  void OnDone(const grpc::Status& status) override;

 private:
  Fleet* fleet_;
  long index_;
  grpc::ClientContext context_;
  pb::Heartbeat message_;
  pb::HeartbeatSummary summary_;
  std::atomic<int> state_{kIdle};
};

class Fleet {
 public:
  explicit Fleet(const Options& options) : options_(options) {}

  int Run();
  void Written(bool ok) { ok ? sent_++ : failed_writes_++; }
  void Ended(long index, const grpc::Status& status);
  Agent& agent(long index) { return agents_[index]; }

 private:
  bool Join();
  void Open(long index);
  void Tick(double due);
  bool Running() const { return !stop_.load() && Clock::now() < deadline_; }
  void Fail(const std::string& error);

  Options options_;
  std::vector<std::unique_ptr<pb::AgentControl::Stub>> stubs_;  // each holds its channel
  std::vector<Agent> agents_;
  std::vector<Stream*> streams_;  // the live stream of each agent
  std::vector<std::unique_ptr<Stream>> all_streams_;  // every stream opened, freed at exit
  std::mutex ended_mutex_;
  std::vector<long> ended_;  // agents whose stream the server ended, to open again
  std::atomic<bool> stop_{false};
  std::atomic<long> sent_{0}, failed_writes_{0}, skipped_{0}, reopened_{0};
  std::mutex error_mutex_;
  std::string error_;
  Clock::time_point deadline_;
  double join_s_ = 0.0;
  long cursor_ = 0;
};

Stream::Stream(Fleet* fleet, long index, pb::AgentControl::Stub* stub) : fleet_(fleet), index_(index) {
  const Agent& agent = fleet->agent(index);
  context_.AddMetadata("x-edgeplane-site", agent.site);
  context_.AddMetadata("x-edgeplane-agent-id", agent.agent_id);
  context_.AddMetadata("x-edgeplane-credential", agent.credential);
  stub->async()->Heartbeats(&context_, &summary_, this);
  AddHold();
  StartCall();
}

bool Stream::Beat() {
  int idle = kIdle;
  if (!state_.compare_exchange_strong(idle, kWriting)) return false;
  Agent& agent = fleet_->agent(index_);
  agent.seq++;
  auto now = std::chrono::system_clock::now().time_since_epoch();
  message_.Clear();
  message_.set_seq(agent.seq);
  message_.set_sent_unix_ms(std::chrono::duration_cast<std::chrono::milliseconds>(now).count());
  message_.set_inflight(agent.seq % 3);
  message_.set_cpu_percent(7.5f);
  message_.set_memory_available_bytes(4ULL << 30);
  message_.set_assignment_version(1);
  // one model's counters, as an agent serving one model sends on every beat
  pb::ModelLoad* load = message_.add_model_load();
  load->set_name("intent");
  load->set_requests_total(agent.seq * 40);
  load->set_busy_seconds_total(agent.seq * 0.4);
  StartWrite(&message_);
  return true;
}

void Stream::OnWriteDone(bool ok) {
  fleet_->Written(ok);
  if (ok) {
    state_.store(kIdle);
  } else {  // the stream is over: let it finish and report why
    state_.store(kDead);
    RemoveHold();
  }
}

void Stream::OnDone(const grpc::Status& status) { fleet_->Ended(index_, status); }

void Fleet::Fail(const std::string& error) {
  std::lock_guard<std::mutex> lock(error_mutex_);
  if (error_.empty()) error_ = error;
  stop_.store(true);
}

void Fleet::Ended(long index, const grpc::Status& status) {
  grpc::StatusCode code = status.error_code();
  if (stop_.load()) return;
  if (code == grpc::StatusCode::CANCELLED || code == grpc::StatusCode::RESOURCE_EXHAUSTED ||
      code == grpc::StatusCode::UNAVAILABLE) {
    std::lock_guard<std::mutex> lock(ended_mutex_);
    ended_.push_back(index);
    return;
  }
  Fail("heartbeat stream of " + agents_[index].site + " ended: " + std::to_string(code) + " " +
       status.error_message());
}

bool Fleet::Join() {
  std::mutex mutex;
  std::condition_variable changed;
  long in_flight = 0, done = 0;
  const long window = 200;
  struct Call {
    grpc::ClientContext context;
    pb::JoinRequest request;
    pb::JoinResponse response;
  };
  std::vector<std::unique_ptr<Call>> calls(agents_.size());
  for (long i = 0; i < static_cast<long>(agents_.size()) && Running(); i++) {
    {
      std::unique_lock<std::mutex> lock(mutex);
      changed.wait(lock, [&] { return in_flight < window; });
      in_flight++;
    }
    long site_number = options_.first_site + i;
    calls[i] = std::make_unique<Call>();
    Call* call = calls[i].get();
    call->context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
    pb::JoinRequest& request = call->request;
    request.set_site(agents_[i].site);
    request.set_bootstrap_token(options_.token);
    request.set_endpoint_url("http://10." + std::to_string(site_number / 62500) + "." +
                             std::to_string(site_number / 250 % 250) + "." + std::to_string(site_number % 250) +
                             ":8080");
    request.set_heartbeat_interval_ms(std::max(50L, std::lround(options_.interval_s * 1000)));
    pb::Capacity* capacity = request.mutable_capacity();
    capacity->set_cpu_cores(4);
    capacity->set_memory_total_bytes(8ULL << 30);
    capacity->add_execution_providers("CPUExecutionProvider");
    stubs_[i % stubs_.size()]->async()->Join(
        &call->context, &call->request, &call->response, [this, i, call, &mutex, &changed, &in_flight, &done](grpc::Status status) {
          if (status.ok()) {
            agents_[i].agent_id = call->response.agent_id();
            agents_[i].credential = call->response.credential();
          } else {
            Fail("join of " + agents_[i].site + " failed: " + std::to_string(status.error_code()) + " " +
                 status.error_message());
          }
          std::lock_guard<std::mutex> lock(mutex);
          in_flight--;
          done++;
          changed.notify_all();
        });
  }
  std::unique_lock<std::mutex> lock(mutex);
  changed.wait(lock, [&] { return in_flight == 0; });
  return error_.empty() && done == static_cast<long>(agents_.size());
}

void Fleet::Open(long index) {
  all_streams_.push_back(std::make_unique<Stream>(this, index, stubs_[index % stubs_.size()].get()));
  streams_[index] = all_streams_.back().get();
}

void Fleet::Tick(double due) {
  std::vector<long> ended;
  {
    std::lock_guard<std::mutex> lock(ended_mutex_);
    ended.swap(ended_);
  }
  for (long index : ended) {
    reopened_++;
    Open(index);
  }
  const long agents = static_cast<long>(agents_.size());
  for (long k = 0; k < static_cast<long>(due); k++) {
    if (!streams_[cursor_]->Beat()) skipped_++;  // its last beat is still being written
    cursor_ = (cursor_ + 1) % agents;
  }
}

int Fleet::Run() {
  deadline_ = Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(options_.max_seconds));
  // Each channel its own TCP connection (a local subchannel pool), as agents on separate
  // machines would have; otherwise channels to one target share a single HTTP/2 link.
  int channels = options_.channels ? options_.channels : static_cast<int>(std::max(8L, options_.agents / 100));
  channels = static_cast<int>(std::min<long>(channels, options_.agents));
  for (int c = 0; c < channels; c++) {
    grpc::ChannelArguments arguments;
    arguments.SetInt("grpc.use_local_subchannel_pool", 1);
    stubs_.push_back(pb::AgentControl::NewStub(
        grpc::CreateCustomChannel(options_.target, grpc::InsecureChannelCredentials(), arguments)));
  }
  agents_.resize(options_.agents);
  for (long i = 0; i < options_.agents; i++) agents_[i].site = "site-" + std::to_string(options_.first_site + i);
  std::thread watcher([this] {  // the benchmark stops the run by closing our standard input
    char buffer[256];
    while (std::fread(buffer, 1, sizeof buffer, stdin) > 0) {
    }
    stop_.store(true);
  });
  watcher.detach();

  const auto started = Clock::now();
  bool joined = Join();
  join_s_ = std::chrono::duration<double>(Clock::now() - started).count();
  if (joined) {
    streams_.resize(agents_.size());
    for (long i = 0; i < options_.agents; i++) Open(i);
    const auto tick = std::chrono::milliseconds(10);
    const double per_tick = options_.agents * 0.010 / options_.interval_s;
    double due = 0.0;
    auto next = Clock::now();
    while (Running()) {
      due += per_tick;
      Tick(due);
      due -= static_cast<long>(due);
      next += tick;
      std::this_thread::sleep_until(next);
    }
  }
  stop_.store(true);
  std::string error;
  {
    std::lock_guard<std::mutex> lock(error_mutex_);
    error = error_;
  }
  std::string quoted;
  for (char c : error) {
    if (c == '"' || c == '\\') quoted += '\\';
    quoted += (c == '\n' ? ' ' : c);
  }
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  double cpu_s = usage.ru_utime.tv_sec + usage.ru_stime.tv_sec + (usage.ru_utime.tv_usec + usage.ru_stime.tv_usec) / 1e6;
  std::printf(
      "{\"sent\": %ld, \"reopened\": %ld, \"skipped\": %ld, \"failed_writes\": %ld, \"join_s\": %.2f, \"cpu_s\": %.2f, "
      "\"error\": \"%s\"}\n",
      sent_.load(), reopened_.load(), skipped_.load(), failed_writes_.load(), join_s_, cpu_s, quoted.c_str());
  std::fflush(stdout);
  // The kernel closes every connection, which the hub sees as each agent's stream ending;
  // tearing 100,000 calls down one by one here would only add to the run.
  std::_Exit(error.empty() ? 0 : 2);
}

Options Parse(int argc, char** argv) {
  Options options;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string flag = argv[i], value = argv[i + 1];
    if (flag == "--target") options.target = value;
    else if (flag == "--token") options.token = value;
    else if (flag == "--agents") options.agents = std::stol(value);
    else if (flag == "--first-site") options.first_site = std::stol(value);
    else if (flag == "--interval") options.interval_s = std::stod(value);
    else if (flag == "--max-seconds") options.max_seconds = std::stod(value);
    else if (flag == "--channels") options.channels = std::stoi(value);
    else {
      std::fprintf(stderr, "hbgen: unknown option %s\n", flag.c_str());
      std::exit(64);
    }
  }
  if (options.target.empty() || options.agents < 1 || options.interval_s <= 0) {
    std::fprintf(stderr, "usage: hbgen --target HOST:PORT --agents N --interval S [--first-site K] [--token T] "
                         "[--max-seconds S] [--channels C]\n");
    std::exit(64);
  }
  return options;
}

}  // namespace

int main(int argc, char** argv) {
  Options options = Parse(argc, argv);
  Fleet fleet(options);
  return fleet.Run();
}
