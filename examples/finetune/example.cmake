# examples/finetune: needs zlib (Debian: zlib1g-dev) to read the gzip-compressed data set and to
# deflate the PNG plot. Included by examples/CMakeLists.txt with LOWRANK_EXAMPLE_NAME/_DIR set.
find_package(ZLIB)
if(ZLIB_FOUND)
  add_executable(${LOWRANK_EXAMPLE_NAME} ${LOWRANK_EXAMPLE_DIR}/main.cpp)
  target_link_libraries(${LOWRANK_EXAMPLE_NAME} PRIVATE lowrank::lowrank lowrank_dev_flags ZLIB::ZLIB)
  # The committed data set, so the program runs from any directory with no argument.
  target_compile_definitions(${LOWRANK_EXAMPLE_NAME} PRIVATE
    LOWRANK_EXAMPLE_DATA="${PROJECT_SOURCE_DIR}/examples/data/digits.csv.gz")
  if(LOWRANK_BUILD_TESTS)
    # Smoke test: the whole experiment (about a second) runs, reads the data and writes the plot.
    add_test(NAME example_finetune
             COMMAND ${LOWRANK_EXAMPLE_NAME} --plot ${CMAKE_CURRENT_BINARY_DIR}/finetune_loss.png)
    set_tests_properties(example_finetune PROPERTIES TIMEOUT 120)
  endif()
else()
  message(STATUS "examples/finetune is not built: zlib not found (Debian: apt-get install zlib1g-dev)")
endif()
