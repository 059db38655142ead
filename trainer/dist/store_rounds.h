// Rounds of posts through a c10d::Store, the primitive under the CPU group's collectives and every group's
// barrier, and the groups' orderly departure (rank 0's process serves the store: it must outlive the others'
// last requests). Round s: each rank posts one value under its own key, then waits until every rank has posted
// round s. Once a rank has seen round s complete, every rank has finished round s - 1 (a rank posts s only
// after finishing s - 1), so each rank deletes its own key of round s - 1 then: the store holds at most two
// rounds of values.
#pragma once

#include <torch/csrc/distributed/c10d/Store.hpp>

#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <set>
#include <string>
#include <vector>

namespace qlora::dist {

class StoreRounds {
 public:
  StoreRounds(c10::intrusive_ptr<c10d::Store> store, int64_t rank, int64_t world)
      : store_(std::move(store)), rank_(rank), world_(world) {}

  // How many distinct hosts the ranks run on (one round: every rank's host name).
  int64_t count_hosts() {
    char name[256] = {};
    ::gethostname(name, sizeof(name) - 1);
    const std::string mine(name);
    std::set<std::string> hosts;
    for (const auto& h : exchange(std::vector<uint8_t>(mine.begin(), mine.end()), /*want_all=*/true))
      hosts.insert(std::string(reinterpret_cast<const char*>(h.data()), h.size()));
    return static_cast<int64_t>(hosts.size());
  }

  // At a group's end: the other ranks post their departure as their last request; rank 0 waits for them (up
  // to `timeout`: a rank that died does not hold it long) before its store, which serves theirs, goes away.
  // Never throws (it runs in destructors).
  void depart(std::chrono::milliseconds timeout) noexcept {
    try {
      if (rank_ != 0) {
        store_->set("qlora/gone/" + std::to_string(rank_), std::vector<uint8_t>{});
        return;
      }
      std::vector<std::string> keys;
      for (int64_t r = 1; r < world_; ++r) keys.push_back("qlora/gone/" + std::to_string(r));
      store_->wait(keys, timeout);
    } catch (...) {  // the store is gone or a rank is: nothing left to protect
    }
  }

  // Posts `value` for this round, waits for every rank's post, and returns every rank's value in rank
  // order (want_all), or only rank `from`'s as the one element (otherwise; the others' posts only mark
  // their arrival).
  std::vector<std::vector<uint8_t>> exchange(const std::vector<uint8_t>& value, bool want_all, int64_t from = 0) {
    const int64_t s = round_++;
    store_->set(key(s, rank_), value);
    std::vector<std::string> keys;
    for (int64_t r = 0; r < world_; ++r) keys.push_back(key(s, r));
    store_->wait(keys);
    std::vector<std::vector<uint8_t>> out;
    if (want_all) {
      out = store_->multiGet(keys);
    } else {
      out.push_back(store_->get(key(s, from)));
    }
    if (s > 0) store_->deleteKey(key(s - 1, rank_));
    return out;
  }

 private:
  static std::string key(int64_t round, int64_t rank) {
    return "qlora/" + std::to_string(round) + "/" + std::to_string(rank);
  }

  c10::intrusive_ptr<c10d::Store> store_;
  int64_t rank_, world_;
  int64_t round_ = 0;
};

}  // namespace qlora::dist
