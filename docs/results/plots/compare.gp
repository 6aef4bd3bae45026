set grid
set key outside right noenhanced
set terminal pngcairo size 1100,900 font 'sans,10'
set output 'docs/results/plots/loss.png'
set multiplot layout 2,1
set xlabel 'training tokens (millions)'
set ylabel 'cross-entropy (nats)'
set title 'Validation loss: mean over seeds, band = min-max'
plot 'docs/results/plots/validation_top2-switch.dat' using 1:3:4 with filledcurves fs transparent solid 0.15 lc 1 notitle, 'docs/results/plots/validation_top2-noloss.dat' using 1:3:4 with filledcurves fs transparent solid 0.15 lc 2 notitle, 'docs/results/plots/validation_loss-free.dat' using 1:3:4 with filledcurves fs transparent solid 0.15 lc 3 notitle, 'docs/results/plots/validation_bip.dat' using 1:3:4 with filledcurves fs transparent solid 0.15 lc 4 notitle, 'docs/results/plots/validation_ec-causal.dat' using 1:3:4 with filledcurves fs transparent solid 0.15 lc 5 notitle, 'docs/results/plots/validation_ec-noncausal.dat' using 1:3:4 with filledcurves fs transparent solid 0.15 lc 6 notitle, 'docs/results/plots/validation_hierarchical.dat' using 1:3:4 with filledcurves fs transparent solid 0.15 lc 7 notitle, 'docs/results/plots/validation_moce.dat' using 1:3:4 with filledcurves fs transparent solid 0.15 lc 8 notitle, 'docs/results/plots/validation_dense-active.dat' using 1:3:4 with filledcurves fs transparent solid 0.15 lc 9 notitle, 'docs/results/plots/validation_dense-total.dat' using 1:3:4 with filledcurves fs transparent solid 0.15 lc 10 notitle, 'docs/results/plots/validation_top2-cap1.25.dat' using 1:3:4 with filledcurves fs transparent solid 0.15 lc 11 notitle, 'docs/results/plots/validation_moce-2x8.dat' using 1:3:4 with filledcurves fs transparent solid 0.15 lc 12 notitle, 'docs/results/plots/validation_moce-per-layer.dat' using 1:3:4 with filledcurves fs transparent solid 0.15 lc 13 notitle, 'docs/results/plots/validation_moce-gate.dat' using 1:3:4 with filledcurves fs transparent solid 0.15 lc 14 notitle, 'docs/results/plots/validation_moce-general.dat' using 1:3:4 with filledcurves fs transparent solid 0.15 lc 15 notitle, 'docs/results/plots/validation_ec-causal-rerun.dat' using 1:3:4 with filledcurves fs transparent solid 0.15 lc 16 notitle, 'docs/results/plots/validation_top2-switch.dat' using 1:2 with linespoints lw 2 pt 7 ps 0.6 lc 1 title 'top2-switch', 'docs/results/plots/validation_top2-noloss.dat' using 1:2 with linespoints lw 2 pt 7 ps 0.6 lc 2 title 'top2-noloss', 'docs/results/plots/validation_loss-free.dat' using 1:2 with linespoints lw 2 pt 7 ps 0.6 lc 3 title 'loss-free', 'docs/results/plots/validation_bip.dat' using 1:2 with linespoints lw 2 pt 7 ps 0.6 lc 4 title 'bip', 'docs/results/plots/validation_ec-causal.dat' using 1:2 with linespoints lw 2 pt 7 ps 0.6 lc 5 title 'ec-causal', 'docs/results/plots/validation_ec-noncausal.dat' using 1:2 with linespoints lw 2 pt 7 ps 0.6 lc 6 title 'ec-noncausal', 'docs/results/plots/validation_hierarchical.dat' using 1:2 with linespoints lw 2 pt 7 ps 0.6 lc 7 title 'hierarchical', 'docs/results/plots/validation_moce.dat' using 1:2 with linespoints lw 2 pt 7 ps 0.6 lc 8 title 'moce', 'docs/results/plots/validation_dense-active.dat' using 1:2 with linespoints lw 2 pt 7 ps 0.6 lc 9 title 'dense-active', 'docs/results/plots/validation_dense-total.dat' using 1:2 with linespoints lw 2 pt 7 ps 0.6 lc 10 title 'dense-total', 'docs/results/plots/validation_top2-cap1.25.dat' using 1:2 with linespoints lw 2 pt 7 ps 0.6 lc 11 title 'top2-cap1.25', 'docs/results/plots/validation_moce-2x8.dat' using 1:2 with linespoints lw 2 pt 7 ps 0.6 lc 12 title 'moce-2x8', 'docs/results/plots/validation_moce-per-layer.dat' using 1:2 with linespoints lw 2 pt 7 ps 0.6 lc 13 title 'moce-per-layer', 'docs/results/plots/validation_moce-gate.dat' using 1:2 with linespoints lw 2 pt 7 ps 0.6 lc 14 title 'moce-gate', 'docs/results/plots/validation_moce-general.dat' using 1:2 with linespoints lw 2 pt 7 ps 0.6 lc 15 title 'moce-general', 'docs/results/plots/validation_ec-causal-rerun.dat' using 1:2 with linespoints lw 2 pt 7 ps 0.6 lc 16 title 'ec-causal-rerun'
set title 'Training loss: mean over seeds, moving average'
plot 'docs/results/plots/train_top2-switch.dat' using 1:2 with lines lw 2 lc 1 title 'top2-switch', 'docs/results/plots/train_top2-noloss.dat' using 1:2 with lines lw 2 lc 2 title 'top2-noloss', 'docs/results/plots/train_loss-free.dat' using 1:2 with lines lw 2 lc 3 title 'loss-free', 'docs/results/plots/train_bip.dat' using 1:2 with lines lw 2 lc 4 title 'bip', 'docs/results/plots/train_ec-causal.dat' using 1:2 with lines lw 2 lc 5 title 'ec-causal', 'docs/results/plots/train_ec-noncausal.dat' using 1:2 with lines lw 2 lc 6 title 'ec-noncausal', 'docs/results/plots/train_hierarchical.dat' using 1:2 with lines lw 2 lc 7 title 'hierarchical', 'docs/results/plots/train_moce.dat' using 1:2 with lines lw 2 lc 8 title 'moce', 'docs/results/plots/train_dense-active.dat' using 1:2 with lines lw 2 lc 9 title 'dense-active', 'docs/results/plots/train_dense-total.dat' using 1:2 with lines lw 2 lc 10 title 'dense-total', 'docs/results/plots/train_top2-cap1.25.dat' using 1:2 with lines lw 2 lc 11 title 'top2-cap1.25', 'docs/results/plots/train_moce-2x8.dat' using 1:2 with lines lw 2 lc 12 title 'moce-2x8', 'docs/results/plots/train_moce-per-layer.dat' using 1:2 with lines lw 2 lc 13 title 'moce-per-layer', 'docs/results/plots/train_moce-gate.dat' using 1:2 with lines lw 2 lc 14 title 'moce-gate', 'docs/results/plots/train_moce-general.dat' using 1:2 with lines lw 2 lc 15 title 'moce-general', 'docs/results/plots/train_ec-causal-rerun.dat' using 1:2 with lines lw 2 lc 16 title 'ec-causal-rerun'
unset multiplot
set terminal pngcairo size 1100,550 font 'sans,10'
set output 'docs/results/plots/max_vio_batch.png'
set title 'MaxVio_batch per training step (mean over MoE layers and seeds, moving average); dashed: 0.5' noenhanced
set xlabel 'step'
set ylabel 'MaxVio_batch' noenhanced
set logscale y
plot 'docs/results/plots/max_vio_top2-switch.dat' using 1:2 with lines lw 2 lc 1 title 'top2-switch', 'docs/results/plots/max_vio_top2-noloss.dat' using 1:2 with lines lw 2 lc 2 title 'top2-noloss', 'docs/results/plots/max_vio_loss-free.dat' using 1:2 with lines lw 2 lc 3 title 'loss-free', 'docs/results/plots/max_vio_bip.dat' using 1:2 with lines lw 2 lc 4 title 'bip', 'docs/results/plots/max_vio_ec-causal.dat' using 1:2 with lines lw 2 lc 5 title 'ec-causal', 'docs/results/plots/max_vio_ec-noncausal.dat' using 1:2 with lines lw 2 lc 6 title 'ec-noncausal', 'docs/results/plots/max_vio_hierarchical.dat' using 1:2 with lines lw 2 lc 7 title 'hierarchical', 'docs/results/plots/max_vio_moce.dat' using 1:2 with lines lw 2 lc 8 title 'moce', 'docs/results/plots/max_vio_dense-active.dat' using 1:2 with lines lw 2 lc 9 title 'dense-active', 'docs/results/plots/max_vio_dense-total.dat' using 1:2 with lines lw 2 lc 10 title 'dense-total', 'docs/results/plots/max_vio_top2-cap1.25.dat' using 1:2 with lines lw 2 lc 11 title 'top2-cap1.25', 'docs/results/plots/max_vio_moce-2x8.dat' using 1:2 with lines lw 2 lc 12 title 'moce-2x8', 'docs/results/plots/max_vio_moce-per-layer.dat' using 1:2 with lines lw 2 lc 13 title 'moce-per-layer', 'docs/results/plots/max_vio_moce-gate.dat' using 1:2 with lines lw 2 lc 14 title 'moce-gate', 'docs/results/plots/max_vio_moce-general.dat' using 1:2 with lines lw 2 lc 15 title 'moce-general', 'docs/results/plots/max_vio_ec-causal-rerun.dat' using 1:2 with lines lw 2 lc 16 title 'ec-causal-rerun', 0.5 with lines dt 2 lc rgb 'black' notitle
unset logscale y
set terminal pngcairo size 1260,1840 font 'sans,9'
set output 'docs/results/plots/load_heatmaps.png'
set multiplot layout 6,3 title 'Expert load during training (load / mean load, both MoE layers summed; first seed)'
unset key
set xlabel 'training step'
set ylabel 'expert'
set cbrange [0:3]
set palette rgbformulae 21,22,23
set title 'top2-switch' noenhanced
set yrange [-0.5:15.5]
set xrange [*:*]
plot 'docs/results/plots/load_top2-switch.dat' using 1:2:3 with image
set title 'top2-noloss' noenhanced
set yrange [-0.5:15.5]
set xrange [*:*]
plot 'docs/results/plots/load_top2-noloss.dat' using 1:2:3 with image
set title 'loss-free' noenhanced
set yrange [-0.5:15.5]
set xrange [*:*]
plot 'docs/results/plots/load_loss-free.dat' using 1:2:3 with image
set title 'bip' noenhanced
set yrange [-0.5:15.5]
set xrange [*:*]
plot 'docs/results/plots/load_bip.dat' using 1:2:3 with image
set title 'ec-causal' noenhanced
set yrange [-0.5:15.5]
set xrange [*:*]
plot 'docs/results/plots/load_ec-causal.dat' using 1:2:3 with image
set title 'ec-noncausal' noenhanced
set yrange [-0.5:15.5]
set xrange [*:*]
plot 'docs/results/plots/load_ec-noncausal.dat' using 1:2:3 with image
set title 'hierarchical' noenhanced
set yrange [-0.5:15.5]
set xrange [*:*]
plot 'docs/results/plots/load_hierarchical.dat' using 1:2:3 with image
set title 'moce' noenhanced
set yrange [-0.5:15.5]
set xrange [*:*]
plot 'docs/results/plots/load_moce.dat' using 1:2:3 with image
set title 'dense-active' noenhanced
set yrange [-0.5:0.5]
set xrange [*:*]
plot 'docs/results/plots/load_dense-active.dat' using 1:2:3 with image
set title 'dense-total' noenhanced
set yrange [-0.5:0.5]
set xrange [*:*]
plot 'docs/results/plots/load_dense-total.dat' using 1:2:3 with image
set title 'top2-cap1.25' noenhanced
set yrange [-0.5:15.5]
set xrange [*:*]
plot 'docs/results/plots/load_top2-cap1.25.dat' using 1:2:3 with image
set title 'moce-2x8' noenhanced
set yrange [-0.5:15.5]
set xrange [*:*]
plot 'docs/results/plots/load_moce-2x8.dat' using 1:2:3 with image
set title 'moce-per-layer' noenhanced
set yrange [-0.5:15.5]
set xrange [*:*]
plot 'docs/results/plots/load_moce-per-layer.dat' using 1:2:3 with image
set title 'moce-gate' noenhanced
set yrange [-0.5:15.5]
set xrange [*:*]
plot 'docs/results/plots/load_moce-gate.dat' using 1:2:3 with image
set title 'moce-general' noenhanced
set yrange [-0.5:15.5]
set xrange [*:*]
plot 'docs/results/plots/load_moce-general.dat' using 1:2:3 with image
set title 'ec-causal-rerun' noenhanced
set yrange [-0.5:15.5]
set xrange [*:*]
plot 'docs/results/plots/load_ec-causal-rerun.dat' using 1:2:3 with image
unset multiplot
unset cbrange
set xrange [*:*]
set yrange [*:*]
set terminal pngcairo size 1380,2020 font 'sans,9'
set output 'docs/results/plots/genre_expert.png'
set multiplot layout 6,3 title 'p(expert | genre) on the validation set (MoE layers summed; first seed)'
unset key
set xlabel 'expert'
set ylabel ''
set cbrange [0:*]
set palette rgbformulae 21,22,23
set ytics ("adventure" 0, "belles_lettres" 1, "fiction_general" 2, "government" 3, "learned" 4, "mystery" 5, "popular_lore" 6, "press_editorial" 7, "press_reportage" 8, "press_reviews" 9, "religion" 10, "romance" 11, "science_fiction" 12, "skill_hobbies" 13) noenhanced
set title 'top2-switch' noenhanced
set xrange [-0.5:15.5]
set yrange [-0.5:13.5]
plot 'docs/results/plots/genre_top2-switch.dat' using 1:2:3 with image
set ytics ("adventure" 0, "belles_lettres" 1, "fiction_general" 2, "government" 3, "learned" 4, "mystery" 5, "popular_lore" 6, "press_editorial" 7, "press_reportage" 8, "press_reviews" 9, "religion" 10, "romance" 11, "science_fiction" 12, "skill_hobbies" 13) noenhanced
set title 'top2-noloss' noenhanced
set xrange [-0.5:15.5]
set yrange [-0.5:13.5]
plot 'docs/results/plots/genre_top2-noloss.dat' using 1:2:3 with image
set ytics ("adventure" 0, "belles_lettres" 1, "fiction_general" 2, "government" 3, "learned" 4, "mystery" 5, "popular_lore" 6, "press_editorial" 7, "press_reportage" 8, "press_reviews" 9, "religion" 10, "romance" 11, "science_fiction" 12, "skill_hobbies" 13) noenhanced
set title 'loss-free' noenhanced
set xrange [-0.5:15.5]
set yrange [-0.5:13.5]
plot 'docs/results/plots/genre_loss-free.dat' using 1:2:3 with image
set ytics ("adventure" 0, "belles_lettres" 1, "fiction_general" 2, "government" 3, "learned" 4, "mystery" 5, "popular_lore" 6, "press_editorial" 7, "press_reportage" 8, "press_reviews" 9, "religion" 10, "romance" 11, "science_fiction" 12, "skill_hobbies" 13) noenhanced
set title 'bip' noenhanced
set xrange [-0.5:15.5]
set yrange [-0.5:13.5]
plot 'docs/results/plots/genre_bip.dat' using 1:2:3 with image
set ytics ("adventure" 0, "belles_lettres" 1, "fiction_general" 2, "government" 3, "learned" 4, "mystery" 5, "popular_lore" 6, "press_editorial" 7, "press_reportage" 8, "press_reviews" 9, "religion" 10, "romance" 11, "science_fiction" 12, "skill_hobbies" 13) noenhanced
set title 'ec-causal' noenhanced
set xrange [-0.5:15.5]
set yrange [-0.5:13.5]
plot 'docs/results/plots/genre_ec-causal.dat' using 1:2:3 with image
set ytics ("adventure" 0, "belles_lettres" 1, "fiction_general" 2, "government" 3, "learned" 4, "mystery" 5, "popular_lore" 6, "press_editorial" 7, "press_reportage" 8, "press_reviews" 9, "religion" 10, "romance" 11, "science_fiction" 12, "skill_hobbies" 13) noenhanced
set title 'ec-noncausal' noenhanced
set xrange [-0.5:15.5]
set yrange [-0.5:13.5]
plot 'docs/results/plots/genre_ec-noncausal.dat' using 1:2:3 with image
set ytics ("adventure" 0, "belles_lettres" 1, "fiction_general" 2, "government" 3, "learned" 4, "mystery" 5, "popular_lore" 6, "press_editorial" 7, "press_reportage" 8, "press_reviews" 9, "religion" 10, "romance" 11, "science_fiction" 12, "skill_hobbies" 13) noenhanced
set title 'hierarchical' noenhanced
set xrange [-0.5:15.5]
set yrange [-0.5:13.5]
plot 'docs/results/plots/genre_hierarchical.dat' using 1:2:3 with image
set ytics ("adventure" 0, "belles_lettres" 1, "fiction_general" 2, "government" 3, "learned" 4, "mystery" 5, "popular_lore" 6, "press_editorial" 7, "press_reportage" 8, "press_reviews" 9, "religion" 10, "romance" 11, "science_fiction" 12, "skill_hobbies" 13) noenhanced
set title 'moce' noenhanced
set xrange [-0.5:15.5]
set yrange [-0.5:13.5]
plot 'docs/results/plots/genre_moce.dat' using 1:2:3 with image
set ytics ("adventure" 0, "belles_lettres" 1, "fiction_general" 2, "government" 3, "learned" 4, "mystery" 5, "popular_lore" 6, "press_editorial" 7, "press_reportage" 8, "press_reviews" 9, "religion" 10, "romance" 11, "science_fiction" 12, "skill_hobbies" 13) noenhanced
set title 'dense-active' noenhanced
set xrange [-0.5:0.5]
set yrange [-0.5:13.5]
plot 'docs/results/plots/genre_dense-active.dat' using 1:2:3 with image
set ytics ("adventure" 0, "belles_lettres" 1, "fiction_general" 2, "government" 3, "learned" 4, "mystery" 5, "popular_lore" 6, "press_editorial" 7, "press_reportage" 8, "press_reviews" 9, "religion" 10, "romance" 11, "science_fiction" 12, "skill_hobbies" 13) noenhanced
set title 'dense-total' noenhanced
set xrange [-0.5:0.5]
set yrange [-0.5:13.5]
plot 'docs/results/plots/genre_dense-total.dat' using 1:2:3 with image
set ytics ("adventure" 0, "belles_lettres" 1, "fiction_general" 2, "government" 3, "learned" 4, "mystery" 5, "popular_lore" 6, "press_editorial" 7, "press_reportage" 8, "press_reviews" 9, "religion" 10, "romance" 11, "science_fiction" 12, "skill_hobbies" 13) noenhanced
set title 'top2-cap1.25' noenhanced
set xrange [-0.5:15.5]
set yrange [-0.5:13.5]
plot 'docs/results/plots/genre_top2-cap1.25.dat' using 1:2:3 with image
set ytics ("adventure" 0, "belles_lettres" 1, "fiction_general" 2, "government" 3, "learned" 4, "mystery" 5, "popular_lore" 6, "press_editorial" 7, "press_reportage" 8, "press_reviews" 9, "religion" 10, "romance" 11, "science_fiction" 12, "skill_hobbies" 13) noenhanced
set title 'moce-2x8' noenhanced
set xrange [-0.5:15.5]
set yrange [-0.5:13.5]
plot 'docs/results/plots/genre_moce-2x8.dat' using 1:2:3 with image
set ytics ("adventure" 0, "belles_lettres" 1, "fiction_general" 2, "government" 3, "learned" 4, "mystery" 5, "popular_lore" 6, "press_editorial" 7, "press_reportage" 8, "press_reviews" 9, "religion" 10, "romance" 11, "science_fiction" 12, "skill_hobbies" 13) noenhanced
set title 'moce-per-layer' noenhanced
set xrange [-0.5:15.5]
set yrange [-0.5:13.5]
plot 'docs/results/plots/genre_moce-per-layer.dat' using 1:2:3 with image
set ytics ("adventure" 0, "belles_lettres" 1, "fiction_general" 2, "government" 3, "learned" 4, "mystery" 5, "popular_lore" 6, "press_editorial" 7, "press_reportage" 8, "press_reviews" 9, "religion" 10, "romance" 11, "science_fiction" 12, "skill_hobbies" 13) noenhanced
set title 'moce-gate' noenhanced
set xrange [-0.5:15.5]
set yrange [-0.5:13.5]
plot 'docs/results/plots/genre_moce-gate.dat' using 1:2:3 with image
set ytics ("adventure" 0, "belles_lettres" 1, "fiction_general" 2, "government" 3, "learned" 4, "mystery" 5, "popular_lore" 6, "press_editorial" 7, "press_reportage" 8, "press_reviews" 9, "religion" 10, "romance" 11, "science_fiction" 12, "skill_hobbies" 13) noenhanced
set title 'moce-general' noenhanced
set xrange [-0.5:15.5]
set yrange [-0.5:13.5]
plot 'docs/results/plots/genre_moce-general.dat' using 1:2:3 with image
set ytics ("adventure" 0, "belles_lettres" 1, "fiction_general" 2, "government" 3, "learned" 4, "mystery" 5, "popular_lore" 6, "press_editorial" 7, "press_reportage" 8, "press_reviews" 9, "religion" 10, "romance" 11, "science_fiction" 12, "skill_hobbies" 13) noenhanced
set title 'ec-causal-rerun' noenhanced
set xrange [-0.5:15.5]
set yrange [-0.5:13.5]
plot 'docs/results/plots/genre_ec-causal-rerun.dat' using 1:2:3 with image
unset multiplot
set ytics autofreq
unset cbrange
set xrange [*:*]
set yrange [*:*]
set key outside right noenhanced
set terminal pngcairo size 1100,850 font 'sans,10'
set output 'docs/results/plots/fault.png'
set multiplot layout 2,1
set xrange [0:300]
set xlabel 'training step'
set arrow 1 from 100, graph 0 to 100, graph 1 nohead dt 2 lc rgb 'red'
set title 'Faulty expert 3''s share of the load (both MoE layers, moving average); dashed: fault starts'
set ylabel 'share of assignments'
plot 'docs/results/plots/fault_share_fault_x100_rel_s1.dat' using 1:2 with lines lw 2 lc 1 title 'fault-x100-rel s1', 'docs/results/plots/fault_share_fault_x100_rel_s2.dat' using 1:2 with lines lw 2 lc 2 title 'fault-x100-rel s2', 'docs/results/plots/fault_share_fault_x100_rel_s3.dat' using 1:2 with lines lw 2 lc 3 title 'fault-x100-rel s3', 'docs/results/plots/fault_share_fault_x100_norel_s1.dat' using 1:2 with lines lw 2 lc 4 title 'fault-x100-norel s1', 'docs/results/plots/fault_share_fault_x100_norel_s2.dat' using 1:2 with lines lw 2 lc 5 title 'fault-x100-norel s2', 'docs/results/plots/fault_share_fault_x100_norel_s3.dat' using 1:2 with lines lw 2 lc 6 title 'fault-x100-norel s3', 'docs/results/plots/fault_share_fault_nan_rel_s1.dat' using 1:2 with lines lw 2 lc 7 title 'fault-nan-rel s1', 'docs/results/plots/fault_share_fault_nan_rel_s2.dat' using 1:2 with lines lw 2 lc 8 title 'fault-nan-rel s2', 'docs/results/plots/fault_share_fault_nan_rel_s3.dat' using 1:2 with lines lw 2 lc 9 title 'fault-nan-rel s3', 'docs/results/plots/fault_share_fault_nan_norel_s1.dat' using 1:2 with lines lw 2 lc 10 title 'fault-nan-norel s1', 'docs/results/plots/fault_share_fault_nan_norel_s2.dat' using 1:2 with lines lw 2 lc 11 title 'fault-nan-norel s2', 'docs/results/plots/fault_share_fault_nan_norel_s3.dat' using 1:2 with lines lw 2 lc 12 title 'fault-nan-norel s3', 'docs/results/plots/fault_share_fault_free_300_s3__no_fault_.dat' using 1:2 with lines lw 2 lc 13 title 'fault-free-300 s3 (no fault)'
set title 'Training loss (moving average)'
set ylabel 'cross-entropy (nats)'
plot 'docs/results/plots/fault_loss_fault_x100_rel_s1.dat' using 1:2 with lines lw 2 lc 1 title 'fault-x100-rel s1', 'docs/results/plots/fault_loss_fault_x100_rel_s2.dat' using 1:2 with lines lw 2 lc 2 title 'fault-x100-rel s2', 'docs/results/plots/fault_loss_fault_x100_rel_s3.dat' using 1:2 with lines lw 2 lc 3 title 'fault-x100-rel s3', 'docs/results/plots/fault_loss_fault_x100_norel_s1.dat' using 1:2 with lines lw 2 lc 4 title 'fault-x100-norel s1', 'docs/results/plots/fault_loss_fault_x100_norel_s2.dat' using 1:2 with lines lw 2 lc 5 title 'fault-x100-norel s2', 'docs/results/plots/fault_loss_fault_x100_norel_s3.dat' using 1:2 with lines lw 2 lc 6 title 'fault-x100-norel s3', 'docs/results/plots/fault_loss_fault_nan_rel_s1.dat' using 1:2 with lines lw 2 lc 7 title 'fault-nan-rel s1', 'docs/results/plots/fault_loss_fault_nan_rel_s2.dat' using 1:2 with lines lw 2 lc 8 title 'fault-nan-rel s2', 'docs/results/plots/fault_loss_fault_nan_rel_s3.dat' using 1:2 with lines lw 2 lc 9 title 'fault-nan-rel s3', 'docs/results/plots/fault_loss_fault_nan_norel_s1.dat' using 1:2 with lines lw 2 lc 10 title 'fault-nan-norel s1', 'docs/results/plots/fault_loss_fault_nan_norel_s2.dat' using 1:2 with lines lw 2 lc 11 title 'fault-nan-norel s2', 'docs/results/plots/fault_loss_fault_nan_norel_s3.dat' using 1:2 with lines lw 2 lc 12 title 'fault-nan-norel s3', 'docs/results/plots/fault_loss_fault_free_300_s3__no_fault_.dat' using 1:2 with lines lw 2 lc 13 title 'fault-free-300 s3 (no fault)'
unset multiplot
unset arrow 1
set xrange [*:*]
set key outside right noenhanced
set terminal pngcairo size 1000,500 font 'sans,10'
set output 'docs/results/plots/routing_cost.png'
set title 'Routing cost vs number of experts (median ms; equal compute: K = 2)'
set logscale xy
set xlabel 'routed experts E'
set ylabel 'ms'
set xtics (16, 32, 64, 128, 256)
plot 'docs/results/plots/routing_scale.dat' using 1:2 with linespoints lw 2 pt 7 title 'topk route()', 'docs/results/plots/routing_scale.dat' using 1:3 with linespoints lw 2 pt 7 title 'hierarchical route()', 'docs/results/plots/routing_scale.dat' using 1:4 with linespoints lw 2 pt 5 dt 2 title 'topk layer fwd+bwd', 'docs/results/plots/routing_scale.dat' using 1:5 with linespoints lw 2 pt 5 dt 2 title 'hierarchical layer fwd+bwd'
unset logscale xy
set xtics autofreq
set terminal pngcairo size 1300,750 font 'sans,10'
set output 'docs/results/plots/bars.png'
set multiplot layout 2,3 title 'mean over seeds, error bars = min-max'
unset key
set style data histograms
set style histogram errorbars gap 1 lw 1
set style fill solid 0.7 border -1
set boxwidth 0.8
set xtics rotate by -30 noenhanced
set xlabel ''
set ylabel ''
set title 'validation perplexity' noenhanced
set yrange [0:101.447]
plot 'docs/results/plots/bar_ppl_validation.dat' using 2:3:4:xtic(1) lc 3
set title 'held-out genre perplexity' noenhanced
set yrange [0:106.203]
plot 'docs/results/plots/bar_ppl_heldout.dat' using 2:3:4:xtic(1) lc 3
set title 'MaxVio_batch (mean over steps)' noenhanced
set yrange [0:7.312]
plot 'docs/results/plots/bar_max_vio_batch.dat' using 2:3:4:xtic(1) lc 3
set title 'MaxVio_global (validation)' noenhanced
set yrange [0:7.45762]
plot 'docs/results/plots/bar_max_vio_global.dat' using 2:3:4:xtic(1) lc 3
set title 'specialisation I(genre; expert)/H(genre)' noenhanced
set yrange [0:0.115327]
plot 'docs/results/plots/bar_specialization.dat' using 2:3:4:xtic(1) lc 3
set title 'optimality gap vs exact balanced optimum' noenhanced
set yrange [-1.83302:0.252061]
plot 'docs/results/plots/bar_gap.dat' using 2:3:4:xtic(1) lc 3
unset multiplot
set yrange [*:*]
