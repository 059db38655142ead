# Third-party libraries, all from the system (Debian packages here, the image on the GPU machine).
# Headers a machine lacks (the GPU machine has no CLI11) may be dropped into .deps/include, which
# scripts/gpu.sh fills from this machine's copies and carries along.
if(EXISTS ${CMAKE_SOURCE_DIR}/.deps/include)
  include_directories(SYSTEM ${CMAKE_SOURCE_DIR}/.deps/include)
endif()

find_package(yaml-cpp REQUIRED)
find_package(nlohmann_json 3.10 REQUIRED)
find_package(Threads REQUIRED)

find_path(CLI11_INCLUDE_DIR CLI/CLI.hpp HINTS ${CMAKE_SOURCE_DIR}/.deps/include REQUIRED)
add_library(qlora_cli11 INTERFACE)
target_include_directories(qlora_cli11 SYSTEM INTERFACE ${CLI11_INCLUDE_DIR})

find_path(SENTENCEPIECE_INCLUDE_DIR sentencepiece_processor.h REQUIRED)
find_library(SENTENCEPIECE_LIBRARY sentencepiece REQUIRED)
add_library(qlora_sentencepiece INTERFACE)
target_include_directories(qlora_sentencepiece SYSTEM INTERFACE ${SENTENCEPIECE_INCLUDE_DIR})
target_link_libraries(qlora_sentencepiece INTERFACE ${SENTENCEPIECE_LIBRARY})

# fmt: LibTorch ships fmt's headers (12.x); use them header-only so there is one fmt in the process.
add_library(qlora_fmt INTERFACE)
target_compile_definitions(qlora_fmt INTERFACE FMT_HEADER_ONLY=1)

if(QLORA_BUILD_TESTS)
  find_package(GTest REQUIRED)
endif()
